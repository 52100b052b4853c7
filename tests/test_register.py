"""MLflow registry: versions, the champion alias, and loading base + adapter back."""

from __future__ import annotations

import torch
from transformers import AutoModelForCausalLM

from esft.adapter import save_adapter
from esft.families import moe_layers
from esft.select import ExpertConfig
from esft.trainable import apply_expert_config
from esft import synthetic
from pipeline.register import load_registered, register_adapter
from tests.conftest import save_model_with_tokenizer


def make_adapter(model_dir, out, scale: float):
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    config = ExpertConfig({str(layer.index): [1, 2] for layer in moe_layers(model)})
    apply_expert_config(model, config)
    with torch.no_grad():
        for layer in moe_layers(model):
            layer.experts.esft_down_proj.mul_(scale)
    save_adapter(model, out, config)
    return model.eval()


def test_versions_champion_alias_and_loading(tmp_path):
    model_dir = save_model_with_tokenizer(tmp_path / "base", synthetic.rows("math", 20, seed=1))
    common = dict(model_name="esft-test", run_dir=tmp_path, metric_name="exact_match", params={"top_p": 0.2},
                  tags={"base_model": str(model_dir), "family": "deepseek_v2", "score_function": "token"},
                  tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}")
    make_adapter(model_dir, tmp_path / "a1", 2.0)
    make_adapter(model_dir, tmp_path / "a2", 3.0)
    trained = make_adapter(model_dir, tmp_path / "a3", 4.0)
    first = register_adapter(tmp_path / "a1", metrics={"exact_match": 0.5}, **common)
    worse = register_adapter(tmp_path / "a2", metrics={"exact_match": 0.4}, **common)
    better = register_adapter(tmp_path / "a3", metrics={"exact_match": 0.7}, **common)
    assert (first.version, worse.version, better.version) == ("1", "2", "3")
    assert first.champion and not worse.champion and better.champion

    loaded, _ = load_registered("models:/esft-test@champion", tracking_uri=common["tracking_uri"])
    ids = torch.randint(4, 300, (1, 12))
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, trained(ids).logits)

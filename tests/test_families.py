"""Model families: structure discovery, inspect, clear errors, and the esft/ import boundary."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from transformers import AutoConfig, AutoModelForCausalLM

from esft.families import FAMILIES, UnsupportedModelError, moe_layers, num_experts, top_k
from esft.model import describe, load_model
from esft.testing import TINY_OVERRIDES, tiny_model
from pipeline.cli import main as esft

EXPECTED_LAYERS = {
    "deepseek_v2": [1, 2, 3],  # first_k_dense_replace = 1
    "deepseek_v3": [1, 2, 3],
    "qwen2_moe": [0, 1, 2, 3],
    "qwen3_moe": [0, 1, 2, 3],
    "mixtral": [0, 1, 2, 3],
    "olmoe": [0, 1, 2, 3],
    "gpt_oss": [0, 1, 2, 3],
}


def test_every_family_is_supported():
    assert set(FAMILIES) == set(TINY_OVERRIDES) == set(EXPECTED_LAYERS)


def test_moe_layers_are_found(family):
    model = tiny_model(family)
    layers = moe_layers(model)
    assert [layer.index for layer in layers] == EXPECTED_LAYERS[family]
    overrides = TINY_OVERRIDES[family]
    expected_experts = overrides.get("n_routed_experts") or overrides.get("num_experts") or overrides["num_local_experts"]
    assert num_experts(layers[0]) == expected_experts
    assert top_k(layers[0]) == 2
    has_shared = family in ("deepseek_v2", "deepseek_v3", "qwen2_moe")
    assert bool(layers[0].shared) == has_shared


def test_describe_counts_parameters():
    d = describe(tiny_model("deepseek_v2"))
    # gate_up [64, 64] + down [64, 32] per expert
    assert d.params_per_expert == 64 * 64 + 64 * 32
    assert d.routed_expert_params == d.params_per_expert * 16 * 3
    assert d.bytes_per_expert == d.params_per_expert * 4
    assert d.moe_layers == [1, 2, 3] and d.dense_layers == [0]
    gpt = describe(tiny_model("gpt_oss"))
    assert gpt.params_per_expert == 64 * 256 + 256 + 128 * 64 + 64  # weights and biases


def test_inspect_cli_reads_a_local_directory_without_weights(tmp_path, capsys):
    tiny_model("olmoe").save_pretrained(tmp_path / "olmoe")
    capsys.readouterr()  # whatever saving printed is not part of the command's output
    assert esft(["inspect", str(tmp_path / "olmoe"), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["family"] == "olmoe" and report["routed_experts_per_layer"] == 16 and report["moe_layers"] == [0, 1, 2, 3]


def test_dense_and_unsupported_models_get_clear_errors(tmp_path, capsys):
    llama = AutoConfig.for_model("llama", vocab_size=100, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                 num_attention_heads=2)
    AutoModelForCausalLM.from_config(llama).save_pretrained(tmp_path / "llama")
    assert esft(["inspect", str(tmp_path / "llama")]) == 2
    assert "unsupported model family 'llama': ESFT supports deepseek_v2" in capsys.readouterr().err

    dense = tiny_model("qwen2_moe", mlp_only_layers=[0, 1, 2, 3])  # a supported family, no MoE layer
    with pytest.raises(UnsupportedModelError, match="has no Mixture-of-Experts layer"):
        moe_layers(dense)

    assert esft(["inspect", str(tmp_path / "missing")]) == 2
    assert "esft: error:" in capsys.readouterr().err


def test_load_model_rejects_unknown_dtype_and_tiny_name():
    with pytest.raises(ValueError, match="unknown tiny model"):
        load_model("tiny:llama")
    with pytest.raises(ValueError, match="unknown dtype"):
        load_model("some/model", dtype="int3")


def test_importing_esft_loads_no_orchestration_framework():
    code = (
        "import sys, esft, esft.adapter, esft.data, esft.model, esft.scores, esft.select, esft.trainable;"
        "print(sorted(m for m in sys.modules if m.split('.')[0] in ('ray', 'deepspeed', 'mlflow')))"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "[]"

"""The README's main command, end to end on the embedded default."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoModelForCausalLM

from esft.numerics import forward_tolerance
from esft.demo.pretrain import ASSET_DIR
from esft.select import load_expert_config
from pipeline.cli import main as esft


@pytest.mark.slow  # the whole quickstart on the embedded model
def test_quickstart_runs_the_core_path(tmp_path):
    out = tmp_path / "run"
    assert esft(["quickstart", "--out", str(out), "--steps", "20"]) == 0
    report = json.loads((out / "report.json").read_text())
    # checked in the run against the rounding tolerance (fused vs selective kernels, see esft.numerics)
    assert report["merged_logits_tolerance"]["atol"] == forward_tolerance(AutoModelForCausalLM.from_pretrained(ASSET_DIR)).atol
    assert report["valid_loss_after"] < report["valid_loss_before"]
    config = load_expert_config(out / "expert_cfg.json")
    assert config.num_selected == report["selected_experts"] >= 3  # at least one per MoE layer
    assert (out / "profile" / "summary.json").exists() and (out / "profile" / "expert_scores.json").exists()
    merged = AutoModelForCausalLM.from_pretrained(out / "merged")
    base = AutoModelForCausalLM.from_pretrained(ASSET_DIR)  # mini-moe, the embedded default
    changed = [n for n, p in merged.named_parameters() if not torch.equal(p, dict(base.named_parameters())[n])]
    assert changed and all(".mlp.experts." in n for n in changed)


def test_quickstart_refuses_to_overwrite(tmp_path, capsys):
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "notes.txt").write_text("keep me")
    assert esft(["quickstart", "--out", str(tmp_path / "run"), "--steps", "1"]) == 2
    assert "already exists" in capsys.readouterr().err
    assert (tmp_path / "run" / "notes.txt").read_text() == "keep me"


def test_merge_check_accepts_rounding_and_refuses_a_real_difference(batch):
    import copy

    import pytest

    from esft.testing import tiny_model
    from esft.demo.quickstart import _check_merged

    input_ids, _ = batch
    trained = tiny_model("deepseek_v2")
    merged = copy.deepcopy(trained)
    with torch.no_grad():  # a few ulps on the LM head: what another kernel's rounding does
        merged.lm_head.weight.mul_(1 + 4 * torch.finfo(torch.float32).eps)
    max_diff, tolerance = _check_merged(trained, merged, input_ids)
    assert 0 < max_diff <= tolerance.atol
    with torch.no_grad():  # a wrong merge
        merged.model.layers[1].mlp.experts.down_proj.mul_(1.05)
    with pytest.raises(RuntimeError, match="merged model differs from the trained model"):
        _check_merged(trained, merged, input_ids)

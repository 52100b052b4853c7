"""Selection: the reference rule exactly, the reference file format, and clear errors."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import pytest

from esft.scores import ScoresError
from esft.select import (
    ExpertConfig,
    SelectionError,
    load_expert_config,
    load_layer_scores,
    select_experts,
    select_top_n,
    select_top_p,
)
from pipeline.cli import main as esft


@pytest.mark.parametrize(
    "scores, top_p, expected",
    [
        ([0.1, 0.3, 0.05, 0.3, 0.25], 0.5, [1, 3]),  # the crossing expert is included
        ([0.1, 0.3, 0.05, 0.3, 0.25], 0.6, [1, 3]),  # reaching p exactly stops the walk
        ([0.1, 0.3, 0.05, 0.3, 0.25], 0.61, [1, 3, 4]),
        ([0.1, 0.3, 0.05, 0.3, 0.25], 1.0, [1, 3, 4, 0, 2]),
        ([0.2, 0.2, 0.2, 0.2, 0.2], 0.3, [0, 1]),  # ties keep ascending expert id
        ([0.0, 0.0, 0.7, 0.3], 1e-9, [2]),  # at least one expert for any p > 0
        ([0.1, 0.1, 0.05], 0.5, [0, 1, 2]),  # total below p: every expert
    ],
)
def test_top_p_rule(scores, top_p, expected):
    assert select_top_p(scores, top_p) == expected


@pytest.mark.parametrize("bad", [0, -0.1, 1.5, math.nan, math.inf])
def test_invalid_top_p(bad):
    with pytest.raises(SelectionError, match=r"top_p must be in \(0, 1\]"):
        select_top_p([0.5, 0.5], bad)


def test_fixed_budget():
    assert select_top_n([0.1, 0.4, 0.2, 0.4], 3) == [1, 3, 2]
    with pytest.raises(SelectionError, match="experts_per_layer"):
        select_top_n([0.1, 0.4], 3)


def test_select_experts_preserves_layer_order_and_writes_reference_json(tmp_path):
    layer_scores = {"1": {"0": 0.5, "1": 0.5}, "10": {"0": 0.1, "1": 0.9}, "2": {"0": 0.9, "1": 0.1}}
    config = select_experts(layer_scores, top_p=0.2)
    assert list(config.experts) == ["1", "10", "2"]
    config.save(tmp_path / "cfg.json")
    expected = '{"experts": {"1": [0], "10": [1], "2": [0]}, "shared_experts": false, "non_expert_modules": false}'
    assert (tmp_path / "cfg.json").read_text() == expected
    assert load_expert_config(tmp_path / "cfg.json") == config
    with pytest.raises(SelectionError, match="exactly one of"):
        select_experts(layer_scores, top_p=0.2, experts_per_layer=1)


def write_summary(path: Path, token: dict, gate: dict | None = None) -> Path:
    path.write_text(json.dumps({"token_scores": token, "gate_scores": gate or token}))
    return path


def test_cli_select_from_reference_summary(tmp_path):
    summary = write_summary(
        tmp_path / "summary.json",
        {"1": {"0": 0.05, "1": 0.15, "2": 0.3, "3": 0.5}, "2": {"0": 0.25, "1": 0.25, "2": 0.25, "3": 0.25}},
    )
    out = tmp_path / "expert_cfg.json"
    assert esft(["select", "--scores", str(summary), "--score-function", "token", "--top-p", "0.6", "--out", str(out)]) == 0
    assert json.loads(out.read_text()) == {"experts": {"1": [3, 2], "2": [0, 1, 2]}, "shared_experts": False,
                                           "non_expert_modules": False}
    assert esft(["select", "--scores", str(tmp_path), "--score-function", "gate", "--experts-per-layer", "1",
                 "--train-shared-experts", "--out", str(out), "--overwrite"]) == 0
    assert json.loads(out.read_text()) == {"experts": {"1": [3], "2": [0]}, "shared_experts": True, "non_expert_modules": False}


def test_cli_select_from_our_scores_file(tmp_path):
    from tests.test_scores import hand_built_scores

    hand_built_scores().save(tmp_path / "expert_scores.json")
    out = tmp_path / "cfg.json"
    assert esft(["select", "--scores", str(tmp_path), "--score-function", "token", "--top-p", "0.5", "--out", str(out)]) == 0
    # token scores (0.3, 0.3, 0.2, 0.2): 0.3 + 0.3 >= 0.5
    assert json.loads(out.read_text())["experts"] == {"7": [0, 1]}


@pytest.mark.parametrize(
    "args, message",
    [
        (["--top-p", "1.5"], "top_p must be in"),
        (["--top-p", "0"], "top_p must be in"),
    ],
)
def test_cli_select_errors(tmp_path, capsys, args, message):
    summary = write_summary(tmp_path / "summary.json", {"1": {"0": 0.5, "1": 0.5}})
    out = tmp_path / "cfg.json"
    assert esft(["select", "--scores", str(summary), "--score-function", "token", *args, "--out", str(out)]) == 2
    assert message in capsys.readouterr().err
    assert not out.exists()


def test_unknown_score_function_is_rejected(tmp_path, capsys):
    with pytest.raises(SystemExit):
        esft(["select", "--scores", str(tmp_path), "--score-function", "entropy", "--top-p", "0.2", "--out", "x"])
    assert "invalid choice: 'entropy'" in capsys.readouterr().err
    with pytest.raises(SelectionError, match="unknown score function"):
        load_layer_scores(tmp_path, "entropy")


def test_malformed_summaries_are_rejected(tmp_path):
    ragged = write_summary(tmp_path / "a.json", {"1": {"0": 0.5, "1": 0.5}, "2": {"0": 1.0}})
    with pytest.raises(ScoresError, match="layer 2 has 1 experts but other layers have 2"):
        load_layer_scores(ragged, "token")
    gaps = write_summary(tmp_path / "b.json", {"1": {"0": 0.5, "2": 0.5}})
    with pytest.raises(ScoresError, match="must map expert ids 0..E-1"):
        load_layer_scores(gaps, "token")
    (tmp_path / "c.json").write_text(json.dumps({"something": 1}))
    with pytest.raises(ScoresError, match="no 'token_scores'"):
        load_layer_scores(tmp_path / "c.json", "token")
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(SelectionError, match="neither expert_scores.json nor summary.json"):
        load_layer_scores(empty, "token")


@pytest.mark.parametrize("value, shown",
                         [(float("nan"), "nan"), ("high", "'high'"), (-0.1, "-0.1"), (None, "None"), (True, "True")])
def test_summary_scores_must_be_finite_non_negative_numbers(tmp_path, capsys, value, shown):
    summary = tmp_path / "summary.json"
    summary.write_text(json.dumps({"token_scores": {"1": {"0": 0.5, "1": value}}}))  # NaN is written as NaN
    with pytest.raises(ScoresError, match=f"layer 1, expert 1 has score {shown}; scores must be finite, non-negative"):
        load_layer_scores(summary, "token")
    out = tmp_path / "cfg.json"
    assert esft(["select", "--scores", str(summary), "--score-function", "token", "--top-p", "0.2", "--out", str(out)]) == 2
    assert "scores must be finite, non-negative numbers" in capsys.readouterr().err
    assert not out.exists()


def test_expert_config_validation():
    with pytest.raises(SelectionError, match="lists an expert twice"):
        ExpertConfig.from_dict({"experts": {"1": [2, 2]}})
    with pytest.raises(SelectionError, match="missing 'experts'"):
        ExpertConfig.from_dict({"shared_experts": True})


REFERENCE_DIR = os.environ.get("ESFT_REFERENCE_DIR")


@pytest.mark.skipif(not REFERENCE_DIR, reason="set ESFT_REFERENCE_DIR to a checkout of deepseek-ai/ESFT to compare")
def test_reproduces_released_expert_configs_bit_for_bit(tmp_path):
    """The released results/expert_configs/<task>.json were made with token scores and p = 0.2."""
    root = Path(REFERENCE_DIR)
    tasks = sorted(p.stem for p in (root / "results/expert_configs").glob("*.json"))
    assert tasks, f"no released expert configs under {root}"
    for task in tasks:
        out = tmp_path / f"{task}.json"
        summary = root / "results/expert_scores" / task / "summary.json"
        assert esft(["select", "--scores", str(summary), "--score-function", "token", "--top-p", "0.2", "--out", str(out)]) == 0
        assert out.read_bytes() == (root / "results/expert_configs" / f"{task}.json").read_bytes(), task

"""The statistics of bench/fidelity.py (the pre-registered protocol), against values computed by hand:
paired bootstrap intervals, interpolation at matched forgetting, per-row task scores, and the
control selections (random experts never overlap the relevant ones; least relevant = lowest scores)."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import numpy as np
import pytest

from esft.scores import SCORES_FILENAME

BENCH = Path(__file__).resolve().parents[1] / "bench" / "fidelity.py"


@pytest.fixture(scope="module")
def fidelity():
    spec = importlib.util.spec_from_file_location("bench_fidelity", BENCH)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses resolve their module by name
    spec.loader.exec_module(module)
    yield module
    del sys.modules[spec.name]


def test_paired_bootstrap_of_a_constant_difference_is_that_difference(fidelity):
    a = {("math", 0): [1.0, 0.0, 1.0, 1.0], ("code", 0): [0.5, 0.5]}
    b = {("math", 0): [0.75, -0.25, 0.75, 0.75], ("code", 0): [0.25, 0.25]}
    mean, low, high = fidelity.bootstrap_diff(a, b)
    assert mean == pytest.approx(0.25) and low == pytest.approx(0.25) and high == pytest.approx(0.25)


def test_paired_bootstrap_interval_matches_the_normal_approximation(fidelity):
    rng = np.random.default_rng(1)
    a = {("math", 0): list(rng.integers(0, 2, 500).astype(float))}
    b = {("math", 0): list(rng.integers(0, 2, 500).astype(float))}
    mean, low, high = fidelity.bootstrap_diff(a, b)
    diff = np.asarray(a[("math", 0)]) - np.asarray(b[("math", 0)])
    half_width = 1.96 * diff.std(ddof=1) / np.sqrt(len(diff))  # the textbook interval, computed independently
    assert mean == pytest.approx(diff.mean())
    assert low == pytest.approx(mean - half_width, abs=0.01) and high == pytest.approx(mean + half_width, abs=0.01)


def test_bootstrap_draws_shared_eval_rows_once_for_every_seed(fidelity):
    """Every seed scores the same eval rows: two seeds with the same differences carry no more
    information than one, so the interval must not narrow (stratifying by seed narrowed it by ~sqrt 2)."""
    rng = np.random.default_rng(2)
    a, b = list(rng.integers(0, 2, 300).astype(float)), list(rng.integers(0, 2, 300).astype(float))
    one = fidelity.bootstrap_diff({("math", 0): a}, {("math", 0): b})
    two = fidelity.bootstrap_diff({("math", 0): a, ("math", 1): a}, {("math", 0): b, ("math", 1): b})
    assert two == pytest.approx(one)


def test_bootstrap_draws_a_repeated_prompt_as_one_observation(fidelity):
    """Rows that repeat a prompt (answered identically) are one observation: 200 distinct rows each
    repeated twice give the interval of the 200, not that of 400 independent rows."""
    rng = np.random.default_rng(3)
    a, b = rng.integers(0, 2, 200).astype(float), rng.integers(0, 2, 200).astype(float)
    distinct = fidelity.bootstrap_diff({("code", 0): list(a)}, {("code", 0): list(b)})
    repeated = {("code", 0): list(np.repeat(a, 2))}, {("code", 0): list(np.repeat(b, 2))}
    clustered = fidelity.bootstrap_diff(*repeated, clusters={"code": list(np.repeat(np.arange(200), 2))})
    naive = fidelity.bootstrap_diff(*repeated)
    width = lambda interval: interval[2] - interval[1]  # noqa: E731
    assert clustered[0] == pytest.approx(distinct[0])
    assert width(clustered) == pytest.approx(width(distinct), rel=0.08)
    assert width(naive) == pytest.approx(width(distinct) / np.sqrt(2), rel=0.08)
    with pytest.raises(ValueError, match="cluster ids"):
        fidelity.bootstrap_diff(*repeated, clusters={"code": [0, 1]})


def test_matched_forgetting_averages_rates_that_forget_equally(fidelity):
    # law and intent move in coarse steps: two rates can forget exactly as much
    matched = fidelity.matched_forgetting({"fft": [(0.0, 0.2), (0.1, 0.3), (0.1, 0.5)]}, 0.05)
    assert matched["fft"] == pytest.approx((0.2 + 0.4) / 2)


def test_matched_forgetting_interpolates_inside_the_curve_only(fidelity):
    points = {"fft": [(0.4, 0.5), (0.1, 0.2), (0.2, 0.3)], "lora": [(0.3, 0.4), (0.5, 0.6)]}
    matched = fidelity.matched_forgetting(points, 0.15)
    assert matched["fft"] == pytest.approx(0.25) and matched["lora"] is None


def test_row_scores_per_metric(fidelity):
    assert fidelity.row_scores("math", ["3 + 4 = 7. The answer is 7.", "The answer is 8."],
                               ["... The answer is 7.", "... The answer is 9."]) == [1.0, 0.0]
    assert fidelity.row_scores("code", ["16", " 17"], ["16", "16"]) == [1.0, 0.0]
    perfect, partial = fidelity.row_scores("translation", ["te pesepu nova", "te"], ["te pesepu nova", "te pesepu nova"])
    assert perfect == pytest.approx(1.0) and 0.0 < partial < 1.0
    # ROUGE-L is already in [0, 1] (only sacrebleu's metrics are percentages): a perfect summary scores 1
    summary = "Captain Ana Weber unveiled a bronze statue in Ashford on Monday."
    perfect, partial = fidelity.row_scores("summary", [summary, "Captain Ana Weber"], [summary, "Captain Ana Weber spoke"])
    assert perfect == pytest.approx(1.0) and partial == pytest.approx(2 * 1.0 * 0.75 / 1.75)  # P 3/3, R 3/4


def test_control_selections(fidelity, tmp_path, monkeypatch):
    # scores for 2 layers x 8 experts, token mass concentrated on experts 0-1 (layer 1) and 6-7 (layer 2)
    scores_dir = tmp_path / "profile"
    scores_dir.mkdir()
    token = {"1": {str(e): [0.4, 0.3, 0.1, 0.08, 0.06, 0.04, 0.01, 0.01][e] for e in range(8)},
             "2": {str(e): [0.01, 0.01, 0.04, 0.06, 0.08, 0.1, 0.3, 0.4][e] for e in range(8)}}
    gate = {"1": {str(e): [0.05, 0.3, 0.2, 0.1, 0.1, 0.1, 0.1, 0.05][e] for e in range(8)}, "2": token["2"]}
    monkeypatch.setattr(fidelity, "profile_dir", lambda out, task, seed: scores_dir)
    monkeypatch.setattr(fidelity, "load_layer_scores", lambda path, function: {"token": token, "gate": gate}[function])

    class Scores:
        num_experts = 8

    monkeypatch.setattr(fidelity.ExpertScores, "load", staticmethod(lambda path: Scores()))
    (scores_dir / SCORES_FILENAME).write_text(json.dumps({}))
    select = lambda method, draw=0: fidelity.expert_selection(tmp_path, fidelity.Cell("math", 0, method, 1e-3, draw)).experts  # noqa: E731
    relevant = select("esft_token")
    assert relevant == {"1": [0], "2": [7]}  # p = 0.2: the single top expert reaches 0.2 in each layer
    # the lowest score; ties rank by id, the higher id lower (layer 1: 6 and 7 tie -> 7; layer 2: 0 and 1 tie -> 1)
    assert select("esft_least") == {"1": [7], "2": [1]}
    assert select("esft_gate_matched") == {"1": [1], "2": [7]}
    draws = [select("esft_random", d) for d in range(3)]
    for draw in draws:
        assert all(len(draw[layer]) == len(relevant[layer]) and not set(draw[layer]) & set(relevant[layer]) for layer in relevant)
    assert select("esft_random", 0) == draws[0]  # reproducible


def test_summary_of_hand_built_cells(fidelity, tmp_path, monkeypatch):
    """summarise + markdown over one task and seed whose per-row scores are chosen so that every ratio
    is known by hand; the chosen learning rate is the one with the lowest validation loss."""
    monkeypatch.setattr(fidelity, "stability", lambda out, tasks, seeds: {"math": {"seeds": 1.0}})
    monkeypatch.setitem(fidelity.SIZES, "eval", 4)  # 4 eval rows (their prompts cluster the bootstrap)
    aligned = lambda value: {d: [value] * 4 for d in fidelity.ALIGNED}  # noqa: E731
    results = [{"cell": "math/s0/vanilla", "task": "math", "seed": 0, "method": "vanilla", "lr": None, "draw": 0,
                "task_rows": [0.0] * 4, "aligned_rows": aligned(0.8), "task_metric": 0.0, "aligned_metric": 0.8,
                "general_loss": 1.0, "valid_loss": None}]

    def cell(method, lr, task_rows, aligned_value, valid_loss, draw=0):
        name = fidelity.Cell("math", 0, method, lr, draw).name
        results.append({"cell": name, "task": "math", "seed": 0, "method": method, "lr": lr, "draw": draw,
                        "task_rows": task_rows, "aligned_rows": aligned(aligned_value),
                        "task_metric": float(np.mean(task_rows)), "aligned_metric": aligned_value,
                        "general_loss": 1.0 + (0.8 - aligned_value), "valid_loss": valid_loss})
        (tmp_path / "cells" / name).mkdir(parents=True)  # where run_cell finds a finished cell
        (tmp_path / "cells" / name / "result.json").write_text(json.dumps(results[-1]))

    for method, grid in fidelity.GRID.items():  # the middle rate is the chosen one (lowest validation loss)
        for lr, valid_loss in zip(grid, (float("nan") if method == "lora" else 0.5, 0.3, 0.4)):  # NaN: diverged
            chosen = lr == grid[1]
            rows = {"fft": [1.0, 1.0, 1.0, 0.0], "lora": [1.0, 0.0, 0.0, 0.0], "esft_token": [1.0, 1.0, 0.0, 0.0],
                    "esft_gate": [1.0, 1.0, 1.0, 0.0]}[method] if chosen else [0.0] * 4
            forgetting = {"fft": 0.4, "lora": 0.2, "esft_token": 0.1, "esft_gate": 0.1}[method] if chosen else 0.0
            cell(method, lr, rows, 0.8 - forgetting, valid_loss)
    token_lr = fidelity.GRID["esft_token"][1]
    cell("esft_gate_matched", token_lr, [1.0, 0.0, 0.0, 0.0], 0.7, None)
    cell("esft_least", token_lr, [0.0] * 4, 0.7, None)
    for draw in range(fidelity.RANDOM_DRAWS):
        cell("esft_random", token_lr, [1.0, 0.0, 0.0, 0.0] if draw == 0 else [0.0] * 4, 0.7, None, draw)

    rates = fidelity.chosen_rates(tmp_path, ["math"])  # read back from the finished cells, nothing trained
    assert rates == {"math": {method: grid[1] for method, grid in fidelity.GRID.items()}}
    summary = fidelity.summarise(results, rates, ["math"], [0], tmp_path)
    ratios = summary["ratios"]
    assert ratios["task_metric_esft_token_over_fft"] == pytest.approx(0.5 / 0.75, abs=1e-3)
    assert ratios["task_metric_esft_gate_over_fft"] == pytest.approx(1.0)
    assert ratios["task_metric_esft_token_over_lora"] == pytest.approx(2.0)
    assert ratios["forgetting_esft_token_over_fft"] == pytest.approx(0.25)
    # random experts: the mean over draws per row is [1/3, 0, 0, 0]; token - random = [2/3, 1, 0, 0]
    mean, low, high = summary["raw"]["ci95"]["esft_token_minus_esft_random"]
    assert mean == pytest.approx((2 / 3 + 1) / 4, abs=1e-4) and low <= mean <= high
    assert summary["raw"]["task_metric"]["esft_least"] == 0.0
    ci = summary["raw"]["ci95"]
    assert ci["esft_gate_matched_minus_esft_token"][0] == pytest.approx(-0.25)  # gate vs token scores, same counts
    assert ci["aligned_esft_token_minus_fft"][0] == pytest.approx(0.3)  # token keeps 0.7 of the aligned metric, FFT 0.4
    assert summary["raw"]["at_esft_token_forgetting"]["esft_token"] == pytest.approx(0.5)  # its own curve at its own point
    assert (tmp_path / "tradeoff.png").stat().st_size > 0
    text = fidelity.markdown(summary)
    assert "| esft_token | 0.500 | +0.100 |" in text and "task_metric_esft_token_over_fft" in text

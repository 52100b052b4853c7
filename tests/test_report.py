"""Specialisation statistics (esft.report): golden values computed by hand from small count
matrices, so a wrong formula cannot pass."""

from __future__ import annotations

import math

import numpy as np
import pytest

from esft.report import (
    effective_experts,
    routing_mass_ratio,
    save_domain_heatmaps,
    selection_jaccard,
)
from esft.scores import ExpertScores


def scores_from_counts(selections_LE: list[list[int]], top_k: int = 1) -> ExpertScores:
    """Scores whose token-selection counts are `selections_LE` (tokens = row sum / top_k)."""
    counts = np.asarray(selections_LE, dtype=np.int64)
    scores = ExpertScores.empty(tuple(range(1, len(counts) + 1)), counts.shape[1], top_k)
    scores.selections_LE = counts
    scores.tokens_L = counts.sum(axis=1) // top_k
    return scores


def test_effective_experts_is_exp_entropy_of_the_token_distribution():
    uniform_and_peaked = scores_from_counts([[5, 5, 5, 5], [10, 0, 0, 10], [1, 0, 0, 0]])
    assert effective_experts(uniform_and_peaked) == pytest.approx([4.0, 2.0, 1.0])
    skewed = scores_from_counts([[3, 1, 0, 0]])
    p = np.array([0.75, 0.25])
    assert effective_experts(skewed) == pytest.approx([math.exp(-(p * np.log(p)).sum())])


def test_selection_jaccard_counts_layer_expert_pairs():
    a = [{0, 1}, {2}]
    b = [{1}, {2, 3}]
    # pairs a = (0,0) (0,1) (1,2); b = (0,1) (1,2) (1,3): 2 shared of 4
    assert selection_jaccard(a, b) == pytest.approx(0.5)
    assert selection_jaccard([{0}], [{0}]) == 1.0
    # the same expert id in different layers is a different expert
    assert selection_jaccard([{0}, set()], [set(), {0}]) == 0.0


def test_routing_mass_ratio_compares_the_selected_experts_mass():
    # task layer: expert 0 holds 0.5 of the mass, so token p=0.2 selects [0]; general holds 0.1 there
    task = scores_from_counts([[5, 3, 2, 0]])
    general = scores_from_counts([[1, 3, 3, 3]])
    assert routing_mass_ratio(task, general, top_p=0.2) == pytest.approx([0.5 / 0.1])
    # p=0.6 selects experts 0 and 1 (0.5 + 0.3): task 0.8 vs general 0.4
    assert routing_mass_ratio(task, general, top_p=0.6) == pytest.approx([2.0])


def test_domain_heatmaps_write_one_png(tmp_path):
    scores = {"math": scores_from_counts([[5, 3, 2, 0], [1, 1, 1, 1]]), "code": scores_from_counts([[0, 2, 3, 5], [4, 0, 0, 0]])}
    path = save_domain_heatmaps(scores, tmp_path / "heat.png")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

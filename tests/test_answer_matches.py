"""Teacher-forced answer exact match (esft.training.answer_matches), the per-step signal a sweep's ASHA can
rank trials by: golden counts by hand, equality with greedy generation on a real model, and the training
workers' validation (pipeline.train_worker._evaluate) reporting it."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from esft.testing import tiny_model
from esft.training import answer_matches
from pipeline.train_config import TrainConfig
from pipeline.train_worker import _evaluate

IGNORE = -100


def one_hot_logits(predictions: list[list[int]], vocab: int = 5) -> torch.Tensor:
    """Logits whose argmax at position t is predictions[row][t] (the last position predicts nothing)."""
    logits = torch.zeros(len(predictions), len(predictions[0]) + 1, vocab)
    for row, tokens in enumerate(predictions):
        for position, token in enumerate(tokens):
            logits[row, position, token] = 1.0
    return logits


def test_answers_are_runs_of_labelled_positions_and_one_miss_fails_an_answer():
    labels = torch.tensor([[IGNORE, IGNORE, 3, 4, IGNORE, 1, 2],
                           [2, 0, IGNORE, 2, 2, IGNORE, IGNORE]])
    # targets (labels shifted by one): row 0 [_, 3, 4, _, 1, 2] -> answers "3 4" and "1 2";
    # row 1 [0, _, 2, 2, _, _] -> answers "0" (a new run: rows do not continue each other) and "2 2".
    predictions = [[0, 3, 4, 0, 1, 0],  # "3 4" right; "1 2" wrong at its last token
                   [0, 1, 2, 1, 4, 4]]  # "0" right; "2 2" wrong at its second token; unlabelled positions ignored
    assert answer_matches(one_hot_logits(predictions), labels) == (2, 4)
    predictions[0][5] = 2
    assert answer_matches(one_hot_logits(predictions), labels) == (3, 4)
    assert answer_matches(one_hot_logits(predictions), torch.full_like(labels, IGNORE)) == (0, 0)


def greedy(model, prefix: list[int], count: int) -> list[int]:
    """Greedy decoding, one full forward per token (no cache)."""
    ids = list(prefix)
    with torch.no_grad():
        for _ in range(count):
            top = model(torch.tensor([ids])).logits[0, -1].topk(2)
            # No near-tie that rounding could flip: fp32 forwards of other lengths differ by ~1e-7 relative
            # on logits of ~1 here, so a 1e-4 gap makes the comparison with the packed row's forward exact.
            assert float(top.values[0] - top.values[1]) > 1e-4
            ids.append(int(top.indices[0]))
    return ids[len(prefix):]


def planted_row(model, prompts: list[list[int]], answer_lengths: list[int]) -> tuple[list[int], list[int]]:
    """One packed row of prompts, each followed by the model's own greedy answer (labelled)."""
    ids: list[int] = []
    labels: list[int] = []
    for prompt, length in zip(prompts, answer_lengths):
        ids += prompt
        labels += [IGNORE] * len(prompt)
        answer = greedy(model, ids, length)
        ids += answer
        labels += answer
    return ids, labels


@pytest.fixture(scope="module")
def model():
    return tiny_model("deepseek_v2", seed=0)


def test_it_equals_greedy_generation_exact_match(model):
    ids, labels = planted_row(model, [[5, 17, 42, 8, 99], [7, 300, 12, 64]], [4, 3])
    batch = torch.tensor([ids])
    with torch.no_grad():
        assert answer_matches(model(batch).logits, torch.tensor([labels])) == (2, 2)
        # The second answer's second token replaced (in the text and its label): greedy decoding would have
        # written the original one, so that answer no longer matches; the first is untouched.
        position = len(ids) - 2
        changed = (ids[position] + 1) % model.config.vocab_size
        ids[position] = labels[position] = changed
        assert answer_matches(model(torch.tensor([ids])).logits, torch.tensor([labels])) == (1, 2)


def test_the_workers_validation_reports_the_share_of_answers_matched(model):
    rows = []
    for first in (5, 6):
        ids, labels = planted_row(model, [[first, 17, 42, 8], [7, 300, 12]], [3, 3])
        rows.append([ids, labels, [1] * len(ids)])
    wrong = [list(r) for r in rows[1]]
    wrong[0][-1] = wrong[1][-1] = (wrong[0][-1] + 1) % model.config.vocab_size  # its second answer's last token
    packed = np.asarray([*rows, wrong], np.int64)  # [3 rows, (ids, labels, mask), S]
    config = TrainConfig(model="unused", data="unused", eval_rows=3)
    loss, accuracy = _evaluate(model, packed, config, rank=0, world=1, device=torch.device("cpu"))
    assert accuracy == pytest.approx(5 / 6)
    with torch.no_grad():  # the loss, token-weighted over the three rows, as before
        per_row = [(float(model(input_ids=torch.tensor(r[:1]), labels=torch.tensor(r[1:2])).loss), 6) for r in packed]
    assert loss == pytest.approx(sum(v * n for v, n in per_row) / sum(n for _, n in per_row), rel=1e-6)
    config.eval_rows = 2  # only the first eval_rows rows count
    assert _evaluate(model, packed, config, rank=0, world=1, device=torch.device("cpu"))[1] == 1.0

"""Expert scores: golden values, exact merging, and parity with the model's own router logits."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from esft.families import family_of, moe_layers
from esft.routing import capture_routing
from esft.scores import ExpertScores, RowSums, ScoresError, add_rows, layer_row_sums, profile_batch
from esft.testing import tiny_model


def hand_built_scores() -> ExpertScores:
    """One layer (index 7), E=4, K=2; two rows of three tokens, the last token of row 1 is padding.

    row 0: t0 -> experts (0, 1) gates (0.5, 0.25); t1 -> (0, 2) (0.25, 0.25); t2 -> (3, 0) (0.5, 0.125)
    row 1: t0 -> (1, 2) (0.75, 0.125); t1 -> (1, 3) (0.5, 0.5); t2 (padding) -> (0, 1) (1.0, 1.0)
    """
    ids = torch.tensor([[0, 1], [0, 2], [3, 0], [1, 2], [1, 3], [0, 1]])
    gates = torch.tensor([[0.5, 0.25], [0.25, 0.25], [0.5, 0.125], [0.75, 0.125], [0.5, 0.5], [1.0, 1.0]])
    mask = torch.tensor([[1, 1, 1], [1, 1, 0]]).bool()
    tokens, selections, gate = layer_row_sums(ids, gates, mask, num_experts=4)
    rows = RowSums(tokens[:, None], selections[:, None], gate[:, None])
    return add_rows(ExpertScores.empty((7,), num_experts=4, top_k=2), rows)


def test_golden_token_and_gate_scores():
    scores = hand_built_scores()
    # 5 counted tokens; selections: e0: 3, e1: 3, e2: 2, e3: 2 (the padding token is ignored)
    assert scores.tokens_L.tolist() == [5]
    assert scores.selections_LE.tolist() == [[3, 3, 2, 2]]
    np.testing.assert_array_equal(scores.scores("token"), [[3 / 10, 3 / 10, 2 / 10, 2 / 10]])
    # gate mass: e0 = .5+.25+.125, e1 = .25+.75+.5, e2 = .25+.125, e3 = .5+.5
    np.testing.assert_allclose(scores.scores("gate"), [[0.875 / 5, 1.5 / 5, 0.375 / 5, 1.0 / 5]], rtol=0, atol=1e-12)
    # per-sequence means: row 0 has 3 tokens, row 1 has 2
    row0 = np.array([3, 1, 1, 1]) / (3 * 2)
    row1 = np.array([0, 2, 1, 1]) / (2 * 2)
    np.testing.assert_allclose(scores.scores("token", "sequence"), [(row0 + row1) / 2], atol=1e-15)
    gate0 = np.array([0.875, 0.25, 0.25, 0.5]) / 3
    gate1 = np.array([0.0, 1.25, 0.125, 0.5]) / 2
    np.testing.assert_allclose(scores.scores("gate", "sequence"), [(gate0 + gate1) / 2], atol=1e-15)
    assert scores.to_summary()["token_scores"] == {"7": {"0": 0.3, "1": 0.3, "2": 0.2, "3": 0.2}}


def test_token_scores_sum_to_one_per_layer(family, batch):
    scores = profile_batch(tiny_model(family), *batch)
    np.testing.assert_allclose(scores.scores("token").sum(axis=1), 1.0, rtol=1e-12)
    assert scores.tokens_L.tolist() == [int(batch[1].sum())] * len(scores.layers)


def test_merge_is_exact_and_associative():
    model = tiny_model("deepseek_v2")
    generator = torch.Generator().manual_seed(7)
    batches = [torch.randint(4, 1000, (2, 16), generator=generator) for _ in range(3)]
    parts = [profile_batch(model, ids, torch.ones_like(ids)) for ids in batches]
    # One worker that saw every batch (same forwards) must hold exactly the merged integers.
    whole = profile_batch(model, batches[0], torch.ones_like(batches[0]))
    for ids in batches[1:]:
        profile_batch(model, ids, torch.ones_like(ids), into=whole)
    left, right = (parts[0] + parts[1]) + parts[2], parts[0] + (parts[1] + parts[2])
    for merged in (left, right):
        assert np.array_equal(merged.selections_LE, whole.selections_LE)
        assert np.array_equal(merged.gate_mass_fixed_LE, whole.gate_mass_fixed_LE)
        assert np.array_equal(merged.tokens_L, whole.tokens_L)
        assert merged.sequences == whole.sequences == 6


def test_merge_rejects_scores_of_another_model():
    a = ExpertScores.empty((1, 2), num_experts=4, top_k=2)
    with pytest.raises(ScoresError, match="different models"):
        a + ExpertScores.empty((1, 2), num_experts=8, top_k=2)


def test_hook_scores_equal_scores_recomputed_from_router_logits(family, batch):
    """Profile through the hooks, then recompute routing independently from the logits the model
    returns with output_router_logits=True, and count by hand."""
    model = tiny_model(family)
    route = family_of(model).routing_from_logits
    if route is None:
        pytest.skip(f"{family} routing depends on more than the logits (selection bias)")
    input_ids, attention_mask = batch
    scores = profile_batch(model, input_ids, attention_mask)
    with torch.no_grad():
        logits = model(input_ids, attention_mask=attention_mask, output_router_logits=True).router_logits
    keep = attention_mask.reshape(-1).bool()
    for row, (layer, layer_logits) in enumerate(zip(moe_layers(model), logits)):
        weights, ids = route(layer_logits, layer.router)
        weights, ids = weights[keep].double().numpy(), ids[keep].numpy()
        counts = np.bincount(ids.reshape(-1), minlength=scores.num_experts)
        gates = np.bincount(ids.reshape(-1), weights=weights.reshape(-1), minlength=scores.num_experts)
        assert scores.selections_LE[row].tolist() == counts.tolist()
        np.testing.assert_allclose(scores.gate_mass_fixed_LE[row] / 2**30, gates, atol=1e-6)


def test_captured_routing_matches_hooked_scores(batch):
    model = tiny_model("mixtral")
    input_ids, attention_mask = batch
    routing = capture_routing(model, input_ids, attention_mask)
    scores = profile_batch(model, input_ids, attention_mask)
    keep = attention_mask.reshape(-1).bool()
    for row, layer in enumerate(scores.layers):
        ids, _ = routing[layer]
        assert np.bincount(ids[keep].reshape(-1).numpy(), minlength=8).tolist() == scores.selections_LE[row].tolist()


def test_loss_token_mask_restricts_counting(batch):
    model = tiny_model("qwen3_moe")
    input_ids, attention_mask = batch
    loss_mask = torch.zeros_like(input_ids)
    loss_mask[:, 10:] = 1
    scores = profile_batch(model, input_ids, attention_mask, token_mask_BS=loss_mask)
    assert scores.tokens_L[0] == int((attention_mask.bool() & loss_mask.bool()).sum())


def test_save_load_roundtrip_and_summary_format(tmp_path, batch):
    scores = profile_batch(tiny_model("qwen2_moe"), *batch)
    scores.metadata.update({"data": "unit-test", "seed": 3})
    path = scores.save(tmp_path / "expert_scores.json")
    loaded = ExpertScores.load(path)
    assert np.array_equal(loaded.gate_mass_fixed_LE, scores.gate_mass_fixed_LE)
    assert loaded.metadata["family"] == "qwen2_moe" and loaded.metadata["seed"] == 3
    summary = scores.to_summary()
    assert set(summary) == {"token_scores", "gate_scores"}
    assert list(summary["token_scores"]) == sorted(str(i) for i in scores.layers)
    value = summary["gate_scores"]["1"]["5"]
    assert value == round(value, 4)


def test_corrupt_scores_files_are_rejected(tmp_path):
    bad = tmp_path / "expert_scores.json"
    bad.write_text("{not json")
    with pytest.raises(ScoresError, match="cannot read scores file"):
        ExpertScores.load(bad)
    data = hand_built_scores().to_json()
    data["selections"] = [[1, 2, 3]]
    bad.write_text(json.dumps(data))
    with pytest.raises(ScoresError, match="declares 1 layers x 4 experts"):
        ExpertScores.load(bad)


@pytest.mark.parametrize(
    "key, value, message",
    [
        ("selections", [[1, "many", 2, 2]], "selections holds 'many', but must hold non-negative integers"),
        ("selections", [[1, -3, 2, 2]], "selections holds -3"),
        ("gate_mass_fixed", [[1.5, 0, 0, 0]], "gate_mass_fixed holds 1.5"),
        ("seq_mean_gate", [[float("nan"), 0.1, 0.2, 0.3]], "seq_mean_gate holds nan, but must hold finite, non-negative numbers"),
        ("seq_mean_gate", [[float("inf"), 0.1, 0.2, 0.3]], "seq_mean_gate holds inf"),
        ("tokens", [True], "tokens holds True"),
        ("tokens", "5", "tokens has shape"),
        ("selections", [[1, 2], [3]], "selections has shape ragged"),
        ("num_experts", "4", "num_experts must be non-negative integers"),
        ("top_k", None, "top_k must be non-negative integers"),
    ],
)
def test_scores_files_must_hold_finite_non_negative_numbers(tmp_path, key, value, message):
    data = hand_built_scores().to_json()
    data[key] = value
    bad = tmp_path / "expert_scores.json"
    bad.write_text(json.dumps(data))  # json writes NaN / Infinity, and Python reads them back
    with pytest.raises(ScoresError, match=message):
        ExpertScores.load(bad)


@pytest.mark.parametrize("key", ["layers", "num_experts", "top_k", "tokens", "selections", "gate_mass_fixed"])
def test_scores_files_missing_a_field_are_rejected(tmp_path, key):
    data = hand_built_scores().to_json()
    del data[key]
    bad = tmp_path / "expert_scores.json"
    bad.write_text(json.dumps(data))
    with pytest.raises(ScoresError, match=f"lacks '{key}'; re-run esft profile"):
        ExpertScores.load(bad)


def test_no_tokens_is_an_error():
    with pytest.raises(ScoresError, match="no tokens were profiled"):
        ExpertScores.empty((1,), 4, 2).scores("token")

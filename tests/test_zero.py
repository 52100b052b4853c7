"""ZeRO stages on CPU (2 Ray Train workers, gloo): the same tiny ESFT run gives the same adapter
under ZeRO-1, ZeRO-2 and ZeRO-3, frozen weights stay untouched, and a ZeRO-3 run resumes from its
checkpoint (read back as data only, pipeline/checkpoint.py).

One ZeRO-2 run of 4 steps is the reference; it keeps its step-2 checkpoint, export included, so
ZeRO-1 and the first half of a ZeRO-3 run are compared at step 2, and the resumed ZeRO-3 run at
step 4. ZeRO-3 partitions every tensor, frozen ones included, across the workers: the first MoE
layer with selected experts (nothing below it trains) is where it used to fail
(pipeline.train_worker.make_experts_zero3_leaves)."""

from __future__ import annotations

import pytest
import torch

from pipeline.data import cached_tokenizer
from pipeline.train import RUN_NAME, prepare_data, run_train
from tests.test_train import adapter_tensors, config, make_assets, merged_changing_only_selected_experts

pytestmark = [pytest.mark.usefixtures("local_ray"), pytest.mark.slow]  # Ray Train runs
STEPS, HALF = 4, 2
RELATIVE = 1e-4  # the same maths, reduced in a different order across the two workers


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    return make_assets(tmp_path_factory.mktemp("zero"))


def small(assets, out, stage: str, **overrides):
    values = {"deepspeed": stage, "steps": STEPS, "save_every": HALF, "eval_every": STEPS, "general_data": None,
              "eval_rows": 4}
    return config(assets, out, **{**values, **overrides})


def export_at(out, step: int):
    return out / "ray" / RUN_NAME / f"checkpoint_{step:06d}" / "export"


def max_relative_difference(actual: dict, expected: dict) -> float:
    """max |a - b| / max |b| over each tensor, the worst tensor's."""
    assert actual.keys() == expected.keys()
    return max(float((actual[k] - expected[k]).abs().max() / expected[k].abs().max()) for k in expected)


@pytest.fixture(scope="module")
def zero2(assets, tmp_path_factory):
    out = tmp_path_factory.mktemp("zero2") / "run"
    return out, run_train(small(assets, out, "zero2"))


def test_zero3_gives_the_zero2_adapter_and_resumes_from_its_checkpoint(assets, zero2, tmp_path):
    reference_out, reference = zero2
    out = tmp_path / "zero3"
    run_train(small(assets, out, "zero3", steps=HALF))
    half = adapter_tensors(out / "adapter")
    assert max_relative_difference(half, adapter_tensors(export_at(reference_out, HALF))) <= RELATIVE

    metrics = run_train(small(assets, out, "zero3", resume=True))
    assert [r["step"] for r in metrics["history"]] == list(range(1, STEPS + 1))
    final = adapter_tensors(out / "adapter")
    expected = adapter_tensors(reference_out / "adapter")
    assert max_relative_difference(final, expected) <= RELATIVE
    assert max_relative_difference(final, half) > 100 * RELATIVE, "steps 3-4 did not train"
    assert metrics["trainable_parameters"] == reference["trainable_parameters"]
    assert metrics["final_valid_loss"] == pytest.approx(reference["final_valid_loss"], rel=RELATIVE)

    # Frozen weights: the adapter changes the selected experts' rows and nothing else, and the
    # workers, which held every frozen tensor in 2 partitions, evaluated exactly base + adapter.
    merged = merged_changing_only_selected_experts(assets / "model", out / "adapter")
    assert metrics["final_valid_loss"] == pytest.approx(valid_loss(merged, small(assets, out, "zero3")), rel=RELATIVE)


def test_zero1_gives_the_zero2_adapter(assets, zero2, tmp_path):
    reference_out, _ = zero2
    out = tmp_path / "zero1"
    run_train(small(assets, out, "zero1", steps=HALF))
    assert max_relative_difference(adapter_tensors(out / "adapter"), adapter_tensors(export_at(reference_out, HALF))) <= RELATIVE


def valid_loss(model, train_config) -> float:
    """The token-weighted validation loss the workers report, computed here in plain torch."""
    rows = prepare_data(train_config, cached_tokenizer(train_config.model, False))["valid"][: train_config.eval_rows]
    total = tokens = 0.0
    model.eval()
    with torch.no_grad():
        for ids, labels, mask in torch.from_numpy(rows):
            count = int((labels[1:] != -100).sum())
            if count:
                total += float(model(input_ids=ids[None], labels=labels[None], attention_mask=mask[None]).loss) * count
                tokens += count
    return total / tokens

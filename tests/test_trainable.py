"""Selective trainability: outputs unchanged, frozen weights bit-identical, gradients exact."""

from __future__ import annotations

import copy

import pytest
import torch

from esft.families import moe_layers, num_experts
from esft.numerics import Tolerance, forward_tolerance
from esft.select import ExpertConfig, SelectionError
from esft.testing import tiny_model
from esft.trainable import apply_expert_config, merge_adapter


def config_for(model, experts=(1, 3, 5), **flags) -> ExpertConfig:
    """Select `experts` in every MoE layer but the first (which keeps a layer with none)."""
    layers = moe_layers(model)
    chosen = [e for e in experts if e < num_experts(layers[0])]
    return ExpertConfig({str(layer.index): list(chosen) for layer in layers[1:]}, **flags)


def adamw_steps(model, input_ids, steps=5, lr=1e-2):
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr, weight_decay=0.1)
    model.train()
    for _ in range(steps):
        model(input_ids, labels=input_ids).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    return optimizer


@pytest.mark.parametrize("implementation", ["grouped_mm", "eager"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_outputs_unchanged_before_training(family, implementation, dtype, batch):
    input_ids, attention_mask = batch
    model = tiny_model(family, dtype=dtype)
    model.set_experts_implementation(implementation)
    assert model.config._experts_implementation == implementation
    reference = copy.deepcopy(model)
    apply_expert_config(model, config_for(model))
    with torch.no_grad():
        expected = reference(input_ids, attention_mask=attention_mask).logits
        actual = model(input_ids, attention_mask=attention_mask).logits
    if implementation == "eager":
        # The same per-expert kernels in the same order (only the selected rows' storage differs):
        # bit-identical by construction.
        assert torch.equal(expected, actual)
    else:
        # Two grouped GEMMs (frozen, trainable) instead of one: the same sums, grouped differently,
        # which some CPUs round differently. Equal within the rounding tolerance.
        assert_within(actual, expected, forward_tolerance(reference))


def assert_within(actual: torch.Tensor, expected: torch.Tensor, tolerance: Tolerance) -> None:
    torch.testing.assert_close(actual, expected, rtol=tolerance.rtol, atol=tolerance.atol)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rounding_tolerance_covers_two_kernels_of_the_same_maths(family, dtype, batch):
    """Calibration on a real pair of kernels: transformers' grouped_mm and eager experts agree
    within the tolerance (in bf16 they differ by an ulp on this stack)."""
    input_ids, attention_mask = batch
    model = tiny_model(family, dtype=dtype)
    with torch.no_grad():
        grouped = model(input_ids, attention_mask=attention_mask).logits
        model.set_experts_implementation("eager")
        eager = model(input_ids, attention_mask=attention_mask).logits
    assert_within(eager, grouped, forward_tolerance(model))


def test_rounding_tolerance_still_catches_a_wrong_update(batch):
    """The tolerance is not vacuous: a 1% change of one selected expert's down projection in one
    layer (a fraction of the tokens) moves the logits well beyond it."""
    input_ids, attention_mask = batch
    model = tiny_model("deepseek_v2")
    reference = copy.deepcopy(model)
    apply_expert_config(model, config_for(model))
    with torch.no_grad():
        moe_layers(model)[1].experts.esft_down_proj[0].mul_(1.01)
        expected = reference(input_ids, attention_mask=attention_mask).logits
        actual = model(input_ids, attention_mask=attention_mask).logits
    assert not forward_tolerance(reference).allows(actual, expected)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_frozen_weights_bit_identical_after_adamw(family, dtype, batch):
    input_ids, _ = batch
    model = tiny_model(family, dtype=dtype)
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    apply_expert_config(model, config_for(model))
    adamw_steps(model, input_ids)
    for name, param in model.named_parameters():
        if name in before:  # every original tensor, the fused experts included
            assert torch.equal(param, before[name]), f"{name} moved"
    merge_adapter(model)
    merged = dict(model.named_parameters())
    config = config_for(model)
    for layer in moe_layers(model):
        selected = config.experts_of(layer.index)
        for name in ("gate_up_proj", "down_proj"):
            key = f"model.layers.{layer.index}.mlp.experts.{name}"
            changed = (merged[key] != before[key]).flatten(1).any(dim=1)
            # exactly the selected rows moved, every other row is bit-identical
            assert changed.nonzero().flatten().tolist() == sorted(selected)


def test_trainable_parameters_are_exactly_the_selected_rows(family):
    model = tiny_model(family)
    config = config_for(model)
    summary = apply_expert_config(model, config)
    trainable = {name: p for name, p in model.named_parameters() if p.requires_grad}
    assert all(".experts.esft_" in name for name in trainable)
    expert_params = sum(p.numel() for layer in moe_layers(model) for n, p in layer.experts.named_parameters()
                        if not n.startswith("esft_"))
    routed = sum(num_experts(layer) for layer in moe_layers(model))
    assert summary.trainable_parameters == expert_params * config.num_selected // routed
    for layer in moe_layers(model)[1:]:
        assert layer.experts.esft_gate_up_proj.shape[0] == len(config.experts_of(layer.index))


def test_optimizer_state_covers_only_selected_rows(batch):
    input_ids, _ = batch
    model = tiny_model("deepseek_v2")
    config = config_for(model)
    apply_expert_config(model, config)
    optimizer = adamw_steps(model, input_ids, steps=1)
    state_elements = sum(s["exp_avg"].numel() for s in optimizer.state.values())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert state_elements == trainable
    fused = sum(layer.experts.gate_up_proj.numel() + layer.experts.down_proj.numel() for layer in moe_layers(model))
    assert state_elements < fused * 0.2  # 3 of 16 experts in 2 of 3 layers


def test_gradients_equal_full_model_gradients(family, batch):
    """The selected rows get exactly the gradient the untouched model computes for them, and no
    frozen tensor gets a gradient at all (no wasted weight-gradient work)."""
    input_ids, attention_mask = batch
    model = tiny_model(family)
    full = copy.deepcopy(model)
    config = config_for(model)
    apply_expert_config(model, config)
    model(input_ids, attention_mask=attention_mask, labels=input_ids).loss.backward()
    full(input_ids, attention_mask=attention_mask, labels=input_ids).loss.backward()
    for layer, full_layer in zip(moe_layers(model), moe_layers(full)):
        assert layer.experts.gate_up_proj.grad is None and layer.experts.down_proj.grad is None
        ids = config.experts_of(layer.index)
        if not ids:
            continue
        for name in ("gate_up_proj", "down_proj"):
            expected = getattr(full_layer.experts, name).grad[sorted(ids)]
            actual = getattr(layer.experts, "esft_" + name).grad
            torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-7)
    assert all(p.grad is None for p in model.parameters() if not p.requires_grad)


def test_bf16_model_keeps_fp32_master_rows(batch):
    input_ids, _ = batch
    model = tiny_model("qwen3_moe", dtype=torch.bfloat16)
    apply_expert_config(model, config_for(model))
    for layer in moe_layers(model)[1:]:
        assert layer.experts.esft_gate_up_proj.dtype == torch.float32
        assert layer.experts.gate_up_proj.dtype == torch.bfloat16
    # An update far below bf16 resolution still accumulates in the fp32 master copy.
    master = moe_layers(model)[1].experts.esft_down_proj
    before = master.detach().clone()
    adamw_steps(model, input_ids, steps=1, lr=1e-6)
    assert not torch.equal(master, before)


def test_shared_experts_and_non_expert_modules_flags():
    model = tiny_model("deepseek_v2")
    apply_expert_config(model, config_for(model, shared_experts=True))
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert any("shared_experts" in n for n in trainable)
    assert not any("self_attn" in n or "embed_tokens" in n for n in trainable)

    model = tiny_model("qwen2_moe")
    apply_expert_config(model, config_for(model, non_expert_modules=True))
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert any("self_attn" in n for n in trainable) and any("mlp.gate.weight" in n for n in trainable)
    assert not any("shared_expert" in n for n in trainable)  # governed by its own flag
    assert not any(n.endswith(("experts.gate_up_proj", "experts.down_proj")) for n in trainable)


def test_config_that_does_not_fit_the_model_is_rejected():
    model = tiny_model("deepseek_v2")  # MoE layers 1..3, 16 experts
    with pytest.raises(SelectionError, match="layer 0, which is not a MoE layer"):
        apply_expert_config(model, ExpertConfig({"0": [1]}))
    with pytest.raises(SelectionError, match="only 16 routed experts"):
        apply_expert_config(model, ExpertConfig({"2": [3, 16]}))
    assert all(p.requires_grad for p in model.parameters()), "a rejected config must leave the model untouched"


def test_applying_twice_is_rejected():
    model = tiny_model("olmoe")
    apply_expert_config(model, config_for(model))
    with pytest.raises(SelectionError, match="already applied"):
        apply_expert_config(model, config_for(model))

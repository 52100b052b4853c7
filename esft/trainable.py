"""Selective trainability of fused experts: train only the selected rows of each fused tensor.

`requires_grad` cannot freeze part of a tensor, and masking gradients is wrong (AdamW's decoupled
weight decay still moves frozen rows, and optimizer state is allocated for every expert). So:

- every original parameter is frozen, and stays bit-identical, untouched by any optimizer;
- the selected experts' rows are copied into small trainable tensors `esft_<name>` [k, ...] on
  the experts module (fp32 master copies when the model runs in bf16/fp16), so optimizer state
  covers k/E of a fused tensor;
- the experts module runs a forward that sends each (token, expert) pair either to the frozen
  fused weights or to the trainable rows. Frozen weights never require grad, so autograd computes
  weight gradients for the selected experts only, and activation gradients for everyone. That is
  where ESFT's training-time saving comes from (ARCHITECTURE §5).

Legend: T = tokens, K = routed experts per token, S = T*K (token, expert) pairs, E = routed
experts, k = selected experts in a layer, H = hidden size.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
from torch import nn
from transformers.integrations.moe import _grouped_linear  # transformers' portable grouped GEMM

from esft.families import MoELayer, family_of, fused_expert_params, moe_layers, num_experts
from esft.select import ExpertConfig, SelectionError

TRAINABLE_PREFIX = "esft_"


@dataclass(frozen=True)
class TrainableSummary:
    trainable_parameters: int
    total_parameters: int
    selected_experts: int
    routed_experts: int

    @property
    def trainable_fraction(self) -> float:
        return self.trainable_parameters / self.total_parameters


def validate_expert_config(model: nn.Module, config: ExpertConfig) -> list[MoELayer]:
    """Check that `config` fits `model` (layers are MoE layers, expert ids exist); return the layers."""
    layers = moe_layers(model)
    by_index = {layer.index: layer for layer in layers}
    for key, ids in config.experts.items():
        layer = by_index.get(int(key))
        if layer is None:
            raise SelectionError(
                f"expert config names layer {key}, which is not a MoE layer of this model "
                f"(MoE layers: {', '.join(str(i) for i in by_index)}); was it made for another model?"
            )
        bad = [i for i in ids if i >= num_experts(layer)]
        if bad:
            raise SelectionError(
                f"expert config selects experts {bad} in layer {key}, but the model has only "
                f"{num_experts(layer)} routed experts per layer; was it made for another model?"
            )
    return layers


def is_selective(experts: nn.Module) -> bool:
    return hasattr(experts, TRAINABLE_PREFIX + "expert_ids")


def apply_expert_config(
    model: nn.Module, config: ExpertConfig, master_dtype: torch.dtype | None = torch.float32
) -> TrainableSummary:
    """Make `model` train exactly what `config` says; everything else is frozen.

    `master_dtype` is the dtype of the trainable expert copies (None: the model's own dtype). Outputs
    are unchanged until the first optimizer step."""
    layers = validate_expert_config(model, config)
    model.requires_grad_(False)
    if config.non_expert_modules:
        expert_tensors = {id(p) for layer in layers for p in layer.experts.parameters()}
        shared_tensors = {id(p) for layer in layers for m in layer.shared for p in m.parameters()}
        for param in model.parameters():
            if id(param) not in expert_tensors and id(param) not in shared_tensors:
                param.requires_grad_(True)
    for layer in layers:
        if config.shared_experts:
            for module in layer.shared:
                module.requires_grad_(True)
        selected = config.experts_of(layer.index)
        if selected:
            _make_selective(layer.experts, sorted(selected), master_dtype)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    # Count the model's own tensors, not our trainable copies of rows it already holds.
    total = sum(p.numel() for n, p in model.named_parameters() if TRAINABLE_PREFIX not in n)
    routed = sum(num_experts(layer) for layer in layers)
    return TrainableSummary(trainable, total, config.num_selected, routed)


def _make_selective(experts: nn.Module, expert_ids: list[int], master_dtype: torch.dtype | None) -> None:
    if is_selective(experts):
        raise SelectionError("an expert config was already applied to this model; load a fresh model to apply another")
    E = int(experts.num_experts)
    ids = torch.tensor(expert_ids, dtype=torch.long, device=experts.gate_up_proj.device)
    slot_of_expert = torch.full((E,), -1, dtype=torch.long, device=ids.device)
    slot_of_expert[ids] = torch.arange(len(expert_ids), device=ids.device)
    for name, frozen in fused_expert_params(experts).items():
        rows = frozen.detach()[ids].to(master_dtype or frozen.dtype).clone()
        experts.register_parameter(TRAINABLE_PREFIX + name, nn.Parameter(rows))
    experts.register_buffer(TRAINABLE_PREFIX + "expert_ids", ids, persistent=False)
    experts.register_buffer(TRAINABLE_PREFIX + "slot_of_expert", slot_of_expert, persistent=False)
    # An instance attribute shadows the class forward; a partial (not a bound method) deep-copies.
    experts.forward = functools.partial(selective_experts_forward, experts)


def selective_experts_forward(
    experts: nn.Module, hidden_TH: torch.Tensor, topk_ids_TK: torch.Tensor, topk_weights_TK: torch.Tensor
) -> torch.Tensor:
    """Drop-in replacement of the experts forward; same maths as transformers' implementations."""
    if experts.config._experts_implementation == "eager":
        return _eager_forward(experts, hidden_TH, topk_ids_TK, topk_weights_TK)
    return _grouped_forward(experts, hidden_TH, topk_ids_TK, topk_weights_TK)


def _trainable(experts: nn.Module, name: str, dtype: torch.dtype) -> torch.Tensor:
    return getattr(experts, TRAINABLE_PREFIX + name).to(dtype)


@dataclass(frozen=True)
class _Segment:
    """Sorted (token, expert) pairs that share a weight tensor: frozen fused, or trainable rows."""

    trainable: bool
    rows: torch.Tensor  # row of each pair in that tensor
    offsets: torch.Tensor  # int32 end offset of each row's group, for grouped GEMMs


def _project(experts: nn.Module, segment: _Segment, x: torch.Tensor, name: str) -> torch.Tensor:
    dtype = x.dtype
    weight = _trainable(experts, name, dtype) if segment.trainable else getattr(experts, name)
    bias = None
    if experts.has_bias:
        biases = _trainable(experts, name + "_bias", dtype) if segment.trainable else getattr(experts, name + "_bias")
        bias = biases[segment.rows]
    return _grouped_linear(x, weight, segment.offsets, bias=bias, is_transposed=experts.is_transposed)


def _grouped_forward(experts, hidden_TH, topk_ids_TK, topk_weights_TK):
    """Grouped GEMMs over two segments of (token, expert) pairs: those routed to frozen experts,
    then those routed to trainable ones. One sort by (frozen id | E + slot) forms both segments;
    each runs the whole expert MLP on its own (no full-size intermediate is split or re-joined),
    and the final sum over K keeps transformers' order. Untrained outputs equal the fused forward's
    within rounding (`esft.numerics`): GEMMs grouped differently may round differently."""
    T, K = topk_ids_TK.shape
    E = int(experts.num_experts)
    dtype = hidden_TH.dtype
    ids_S = topk_ids_TK.reshape(-1)
    slot_S = experts.esft_slot_of_expert[ids_S]
    key_sorted_S, perm_S = torch.sort(torch.where(slot_S >= 0, E + slot_S, ids_S))
    counts = torch.bincount(key_sorted_S, minlength=E + int(experts.esft_expert_ids.numel()))
    n_frozen = int(counts[:E].sum())
    token_S, weight_S = perm_S // K, topk_weights_TK.reshape(-1)[perm_S]

    outputs = []
    for trainable, seg, seg_counts, first_id in (
        (False, slice(0, n_frozen), counts[:E], 0),
        (True, slice(n_frozen, perm_S.numel()), counts[E:], E),
    ):
        if seg.start == seg.stop:
            continue
        segment = _Segment(trainable, key_sorted_S[seg] - first_id, torch.cumsum(seg_counts, 0, dtype=torch.int32))
        h = experts._apply_gate(_project(experts, segment, hidden_TH[token_S[seg]], "gate_up_proj"))
        outputs.append(_project(experts, segment, h, "down_proj") * weight_S[seg].unsqueeze(-1))

    out_SH = outputs[0] if len(outputs) == 1 else torch.cat(outputs)
    inverse = torch.empty_like(perm_S)
    inverse[perm_S] = torch.arange(perm_S.numel(), device=perm_S.device)
    return out_SH[inverse].view(T, K, -1).sum(dim=1).to(dtype)


def _eager_forward(experts, hidden_TH, topk_ids_TK, topk_weights_TK):
    """transformers' eager loop, one expert at a time, reading each expert's weights from the
    frozen fused tensor or from the trainable rows."""
    E = int(experts.num_experts)
    dtype = hidden_TH.dtype
    out_TH = torch.zeros_like(hidden_TH)
    slot_of_expert = experts.esft_slot_of_expert.tolist()
    with torch.no_grad():
        mask_EKT = torch.nn.functional.one_hot(topk_ids_TK, num_classes=E).permute(2, 1, 0)
        hit = torch.greater(mask_EKT.sum(dim=(-1, -2)), 0).nonzero().flatten().tolist()

    def weights_of(expert: int, name: str) -> torch.Tensor:
        slot = slot_of_expert[expert]
        return _trainable(experts, name, dtype)[slot] if slot >= 0 else getattr(experts, name)[expert]

    def project(x, expert, name):
        weight = weights_of(expert, name)
        y = x @ weight if experts.is_transposed else nn.functional.linear(x, weight)
        return y + weights_of(expert, name + "_bias") if experts.has_bias else y

    for expert in hit:
        pos, token_idx = torch.where(mask_EKT[expert])
        h = experts._apply_gate(project(hidden_TH[token_idx], expert, "gate_up_proj"))
        y = project(h, expert, "down_proj") * topk_weights_TK[token_idx, pos, None]
        out_TH.index_add_(0, token_idx, y.to(dtype))
    return out_TH


def trained_rows(experts: nn.Module) -> tuple[list[int], dict[str, torch.Tensor]]:
    """(selected expert ids, {fused name: trainable rows [k, ...]}) of a selective experts module."""
    ids = experts.esft_expert_ids.tolist()
    return ids, {name: getattr(experts, TRAINABLE_PREFIX + name) for name in fused_expert_params(experts)}


def merge_adapter(model: nn.Module) -> nn.Module:
    """Write the trained rows back into the fused tensors and restore the plain forward. The result
    is an ordinary transformers model (save it with `save_pretrained`)."""
    family_of(model)
    for layer in moe_layers(model):
        experts = layer.experts
        if not is_selective(experts):
            continue
        ids, rows = trained_rows(experts)
        index = torch.tensor(ids, device=experts.gate_up_proj.device)
        with torch.no_grad():
            for name, trained in rows.items():
                getattr(experts, name).index_copy_(0, index, trained.to(getattr(experts, name).dtype))
        for name in list(rows):
            delattr(experts, TRAINABLE_PREFIX + name)
        delattr(experts, TRAINABLE_PREFIX + "expert_ids")
        delattr(experts, TRAINABLE_PREFIX + "slot_of_expert")
        del experts.forward
    return model

"""Everything model-specific lives here: one small `Family` record per supported MoE family.

transformers 5.x stores a layer's routed experts as fused 3D tensors (`mlp.experts.gate_up_proj`,
`mlp.experts.down_proj`, one row per expert) and its router returns
`(router_logits, topk_weights, topk_indices)`. The families differ in where the router and the
shared experts live, in the layout of the fused tensors, in how gate values are computed, and in
the per-expert tensor names of their checkpoints (which our adapters use).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from esft.errors import EsftError

# A function that maps router logits [T, E] (plus the router module) to the (weights, ids) [T, K]
# the router returns; only for families whose routing is a pure function of the logits.
RoutingFn = Callable[[torch.Tensor, nn.Module], tuple[torch.Tensor, torch.Tensor]]


class UnsupportedModelError(EsftError):
    """The model is not a supported Mixture-of-Experts causal LM."""


@dataclass(frozen=True)
class Family:
    name: str  # the config's model_type
    router_attr: str  # attribute of the MoE block holding the router
    shared_attrs: tuple[str, ...]  # attributes of the MoE block holding always-on shared experts
    scoring: str  # human description of the router, for `esft inspect`
    gate_value: str  # which number the gate score uses (ESFT-SPEC §2 asks us to say)
    expert_key: Callable[[int, int], str]  # (layer, expert) -> checkpoint prefix of one expert
    expert_names: tuple[str, str, str] | None  # per-expert (gate, up, down) names; None = fused slices
    routing_from_logits: RoutingFn | None = None


def _mlp_key(layer: int, expert: int) -> str:
    return f"model.layers.{layer}.mlp.experts.{expert}."


def _softmax_topk(renormalise: Callable[[nn.Module], bool]) -> RoutingFn:
    def route(logits: torch.Tensor, router: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
        probs = logits.float().softmax(dim=-1)
        weights, ids = torch.topk(probs, router.top_k, dim=-1)
        if renormalise(router):
            weights = weights / weights.sum(dim=-1, keepdim=True)
        return weights, ids

    return route


def _deepseek_v2_route(logits: torch.Tensor, router: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
    if router.topk_method != "greedy":
        raise NotImplementedError("only greedy DeepSeek-V2 routing is recomputed from logits")
    weights, ids = torch.topk(logits.float().softmax(dim=-1), router.top_k, dim=-1)
    return weights * router.routed_scaling_factor, ids


def _gpt_oss_route(logits: torch.Tensor, router: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
    top, ids = torch.topk(logits, router.top_k, dim=-1)
    return top.softmax(dim=-1), ids


_DEEPSEEK_SHARED = ("shared_experts",)
_STANDARD_NAMES = ("gate_proj.weight", "up_proj.weight", "down_proj.weight")


def _qwen_style(name: str, shared_attrs: tuple[str, ...] = ()) -> Family:
    """Qwen2-MoE, Qwen3-MoE and OLMoE route alike: softmax, top-k, optional renormalisation."""
    return Family(
        name=name,
        router_attr="gate",
        shared_attrs=shared_attrs,
        scoring="softmax over all experts, top-k, renormalised iff norm_topk_prob",
        gate_value="top-k softmax probability (renormalised iff norm_topk_prob)",
        expert_key=_mlp_key,
        expert_names=_STANDARD_NAMES,
        routing_from_logits=_softmax_topk(lambda router: router.norm_topk_prob),
    )


FAMILIES: dict[str, Family] = {
    f.name: f
    for f in [
        Family(
            name="deepseek_v2",
            router_attr="gate",
            shared_attrs=_DEEPSEEK_SHARED,
            scoring="softmax over all experts, greedy or group-limited top-k, x routed_scaling_factor, no renormalisation",
            gate_value="softmax probability x routed_scaling_factor (the weight the model applies)",
            expert_key=_mlp_key,
            expert_names=_STANDARD_NAMES,
            routing_from_logits=_deepseek_v2_route,
        ),
        Family(
            name="deepseek_v3",
            router_attr="gate",
            shared_attrs=_DEEPSEEK_SHARED,
            scoring="sigmoid + selection bias, group-limited top-k, renormalised, x routed_scaling_factor",
            gate_value="renormalised sigmoid score x routed_scaling_factor (the weight the model applies; the bias only chooses)",
            expert_key=_mlp_key,
            expert_names=_STANDARD_NAMES,
        ),
        _qwen_style("qwen2_moe", shared_attrs=("shared_expert", "shared_expert_gate")),
        _qwen_style("qwen3_moe"),
        Family(
            name="mixtral",
            router_attr="gate",
            shared_attrs=(),
            scoring="softmax over all experts, top-k, always renormalised",
            gate_value="renormalised top-k softmax probability",
            expert_key=lambda layer, expert: f"model.layers.{layer}.block_sparse_moe.experts.{expert}.",
            expert_names=("w1.weight", "w3.weight", "w2.weight"),
            routing_from_logits=_softmax_topk(lambda r: True),
        ),
        _qwen_style("olmoe"),
        Family(
            name="gpt_oss",
            router_attr="router",
            shared_attrs=(),
            scoring="top-k on raw logits (with router bias), then softmax over the k",
            gate_value="softmax over the k selected logits",
            expert_key=_mlp_key,
            expert_names=None,
            routing_from_logits=_gpt_oss_route,
        ),
    ]
}


@dataclass(frozen=True)
class MoELayer:
    """One decoder layer's MoE block, located in a loaded model."""

    index: int  # decoder-layer index, as used in expert configs ("1".."26" for DeepSeek-V2-Lite)
    block: nn.Module  # the MoE block (`layer.mlp`)
    router: nn.Module
    experts: nn.Module  # holds the fused tensors
    shared: tuple[nn.Module, ...]


def family_of(model: nn.Module) -> Family:
    """The Family record of `model`, or a clear error naming the supported families."""
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if model_type not in FAMILIES:
        raise UnsupportedModelError(
            f"unsupported model family {model_type!r}: ESFT supports {', '.join(sorted(FAMILIES))}; "
            "pass a checkpoint of one of these families"
        )
    return FAMILIES[model_type]


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    layers = getattr(getattr(model, "model", model), "layers", None)
    if not isinstance(layers, nn.ModuleList):
        raise UnsupportedModelError(
            f"cannot find the decoder layers of {type(model).__name__}; load the model with AutoModelForCausalLM"
        )
    return layers


def moe_layers(model: nn.Module) -> list[MoELayer]:
    """Every MoE layer of `model`, in decoder order. Dense layers (DeepSeek's first_k_dense_replace,
    Qwen2-MoE's mlp_only_layers) are skipped; a model without any MoE layer is an error."""
    family = family_of(model)
    found = []
    for index, layer in enumerate(decoder_layers(model)):
        block = getattr(layer, "mlp", None)
        experts = getattr(block, "experts", None)
        if experts is None or not isinstance(getattr(experts, "gate_up_proj", None), torch.Tensor):
            continue
        shared = tuple(getattr(block, name) for name in family.shared_attrs if getattr(block, name, None) is not None)
        found.append(MoELayer(index, block, getattr(block, family.router_attr), experts, shared))
    if not found:
        raise UnsupportedModelError(
            f"{type(model).__name__} has no Mixture-of-Experts layer; ESFT needs a MoE model "
            f"({', '.join(sorted(FAMILIES))})"
        )
    return found


def num_experts(layer: MoELayer) -> int:
    # The module's own count, not a fused tensor's shape: under ZeRO-3 a partitioned tensor has size 0.
    return int(layer.experts.num_experts)


def top_k(layer: MoELayer) -> int:
    return int(layer.router.top_k)


FUSED_NAMES = ("gate_up_proj", "gate_up_proj_bias", "down_proj", "down_proj_bias")


def fused_expert_params(experts: nn.Module) -> dict[str, nn.Parameter]:
    """The fused per-expert tensors of an experts module, first dim = expert (weights and biases)."""
    return {n: getattr(experts, n) for n in FUSED_NAMES if isinstance(getattr(experts, n, None), torch.Tensor)}


def split_expert(family: Family, layer: int, expert: int, rows: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """One expert's rows of the fused tensors -> checkpoint-named per-expert tensors."""
    prefix = family.expert_key(layer, expert)
    if family.expert_names is None:
        return {prefix + name: row for name, row in rows.items()}
    gate_name, up_name, down_name = family.expert_names
    gate, up = rows["gate_up_proj"].chunk(2, dim=0)
    return {prefix + gate_name: gate, prefix + up_name: up, prefix + down_name: rows["down_proj"]}


def join_expert(family: Family, layer: int, expert: int, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Inverse of `split_expert`: checkpoint-named tensors of one expert -> rows of the fused tensors.
    Raises KeyError naming the first missing tensor."""
    prefix = family.expert_key(layer, expert)
    if family.expert_names is None:
        return {name: tensors[prefix + name] for name in FUSED_NAMES}
    gate_name, up_name, down_name = family.expert_names
    gate_up = torch.cat([tensors[prefix + gate_name], tensors[prefix + up_name]], dim=0)
    return {"gate_up_proj": gate_up, "down_proj": tensors[prefix + down_name]}

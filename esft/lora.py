"""The paper's LoRA baseline on fused-expert MoE models (PEFT): rank 8, alpha 16, on every weight
matrix except the embeddings and the LM head — attention, dense MLPs, shared experts, routers,
and every routed expert (PEFT's `target_parameters` gives each expert of a fused 3D tensor its own
rank-r pair).

PEFT 0.21 rewrites `target_modules` ending in gate_proj/up_proj/down_proj into fused-expert
targets for the model types transformers maps onto Qwen2-MoE's checkpoint conversion (DeepSeek,
Qwen3-MoE, OLMoE): meant for adapters trained on older per-expert checkpoints, it would silently
drop LoRA from DeepSeek's dense and shared-expert MLPs. Those Linears are therefore targeted as
2D parameters (`<module>.weight`): the same maths and the same saved keys, with no patching.
"""

from __future__ import annotations

import copy
import re

from peft import LoraConfig, get_peft_model
from peft.utils import transformers_weight_conversion
from torch import nn

from esft.families import fused_expert_params, moe_layers

_LAYER_PREFIX = re.compile(r"^(?:.*\.)?layers\.\d+\.")


def _suffix(name: str) -> str:
    """'model.layers.3.mlp.experts.down_proj' -> 'mlp.experts.down_proj' (the same in every layer)."""
    return _LAYER_PREFIX.sub("", name)


def lora_targets(model: nn.Module, include_router: bool = True) -> tuple[set[str], set[str]]:
    """(Linear module names, parameter names) to adapt, as layer-relative suffixes."""
    names = {id(module): name for name, module in model.named_modules()}
    modules, parameters = set(), set()
    for layer in moe_layers(model):
        experts = names[id(layer.experts)]
        parameters |= {_suffix(f"{experts}.{n}") for n, p in fused_expert_params(layer.experts).items() if p.ndim == 3}
        if include_router and not isinstance(layer.router, nn.Linear):
            parameters.add(_suffix(f"{names[id(layer.router)]}.weight"))
    head = model.get_output_embeddings()
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear) and module is not head:
            modules.add(_suffix(name))
    return modules, parameters


def lora_config(model: nn.Module, rank: int = 8, alpha: int = 16, include_router: bool = True) -> LoraConfig:
    modules, parameters = lora_targets(model, include_router)
    config = LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=0.0, bias="none", task_type="CAUSAL_LM",
                        target_modules=sorted(modules), target_parameters=sorted(parameters))
    probe = copy.deepcopy(config)
    transformers_weight_conversion.convert_peft_config_for_transformers(probe, model=model, conversions=None)
    rewritten = set(config.target_modules) - set(probe.target_modules or [])
    if rewritten:
        config.target_modules = sorted(modules - rewritten)
        config.target_parameters = sorted(parameters | {f"{m}.weight" for m in rewritten})
    return config


def apply_lora(model: nn.Module, rank: int = 8, alpha: int = 16, include_router: bool = True) -> nn.Module:
    """The PEFT model with only LoRA tensors trainable."""
    return get_peft_model(model, lora_config(model, rank, alpha, include_router))


def merge_lora(base: nn.Module, lora_dir: str) -> nn.Module:
    """The base model with a saved LoRA adapter folded into its weights (a plain transformers model)."""
    from peft import PeftModel

    return PeftModel.from_pretrained(base, lora_dir).merge_and_unload()

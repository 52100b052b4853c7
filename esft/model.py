"""Loading models safely and describing their MoE structure (`esft inspect`)."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import transformers
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM, PretrainedConfig
from transformers.models.auto.configuration_auto import CONFIG_MAPPING

from esft.errors import EsftError
from esft.families import FAMILIES, UnsupportedModelError, family_of, fused_expert_params, moe_layers, num_experts, top_k

TINY_PREFIX = "tiny:"
DTYPES = {"auto": "auto", "float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def load_model(
    name_or_path: str, dtype: str = "auto", trust_remote_code: bool = False, device_map: str | None = None,
    revision: str | None = None,
) -> nn.Module:
    """A causal LM from a hub id (at `revision` if given) or a local directory (safetensors weights
    only), or one of the built-in random tiny models (`tiny:<family>`, for tests and demos). Checks
    it is a supported MoE."""
    if name_or_path.startswith(TINY_PREFIX):
        from esft.testing import FAMILIES as TINY_FAMILIES
        from esft.testing import tiny_model

        family = name_or_path[len(TINY_PREFIX):]
        if family not in TINY_FAMILIES:
            raise UnsupportedModelError(f"unknown tiny model {name_or_path!r}; use tiny:<family> with one of "
                                        f"{', '.join(TINY_FAMILIES)}")
        model = tiny_model(family, dtype=torch.float32 if dtype == "auto" else DTYPES[dtype])
        model.config._name_or_path = name_or_path
    else:
        if dtype not in DTYPES:
            raise EsftError(f"unknown dtype {dtype!r}; use one of {', '.join(DTYPES)}")
        check_model_source(name_or_path, trust_remote_code, revision)
        try:
            model = AutoModelForCausalLM.from_pretrained(
                name_or_path,
                dtype=DTYPES[dtype],
                trust_remote_code=trust_remote_code,
                use_safetensors=True,  # never unpickle weights
                device_map=device_map,
                **({"revision": revision} if revision else {}),
            )
        except (OSError, ValueError) as error:  # ValueError: e.g. custom code without trust_remote_code
            raise EsftError(f"cannot load model {name_or_path!r}: {str(error).splitlines()[0]}") from error
    moe_layers(model)  # raises a clear error for unsupported or dense models
    return model


def check_model_source(name_or_path: str, trust_remote_code: bool = False, revision: str | None = None) -> None:
    """One clear line for two inputs transformers reports misleadingly: a local directory that does
    not exist (huggingface_hub calls it a malformed repo id, "Repo id must be in the form ...") and
    a config.json whose model_type transformers does not know (3 lines of upgrade advice, although
    ESFT would not support an unknown family anyway). Reads only config.json."""
    looks_local = name_or_path.startswith(("/", ".", "~")) or name_or_path.count("/") > 1 or "\\" in name_or_path
    if looks_local and not Path(name_or_path).expanduser().exists():  # a hub id is NAME or ORG/NAME
        raise EsftError(f"no model directory at {name_or_path}; give an existing model directory "
                        "or a hub id such as deepseek-ai/DeepSeek-V2-Lite")
    try:
        config, _ = PretrainedConfig.get_config_dict(name_or_path, **({"revision": revision} if revision else {}))
    except (OSError, ValueError) as error:  # ValueError: transformers' own checks of the name
        raise EsftError(f"cannot load model config {name_or_path!r}: {str(error).splitlines()[0]}") from error
    model_type = config.get("model_type")
    custom_code = trust_remote_code and "auto_map" in config
    if isinstance(model_type, str) and model_type not in CONFIG_MAPPING and not custom_code:
        raise UnsupportedModelError(
            f"model {name_or_path!r} has model_type {model_type!r}, which transformers {transformers.__version__} does not "
            f"know; ESFT supports the MoE families {', '.join(sorted(FAMILIES))}: pass a checkpoint of one of them")


def load_skeleton(name_or_path: str, trust_remote_code: bool = False) -> nn.Module:
    """The model's structure without its weights (meta device): enough to inspect a 600B model."""
    if name_or_path.startswith(TINY_PREFIX):
        return load_model(name_or_path)
    check_model_source(name_or_path, trust_remote_code)
    try:
        config = AutoConfig.from_pretrained(name_or_path, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as error:  # ValueError: custom code without trust_remote_code, no model_type
        raise EsftError(f"cannot load model config {name_or_path!r}: {str(error).splitlines()[0]}") from error
    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config, trust_remote_code=trust_remote_code)


@dataclass(frozen=True)
class MoEDescription:
    family: str
    router: str
    gate_value: str
    moe_layers: list[int]
    dense_layers: list[int]
    routed_experts_per_layer: int
    top_k: int
    shared_expert_params_per_layer: int
    params_per_expert: int
    bytes_per_expert: int
    routed_expert_params: int
    total_params: int
    total_bytes: int
    dtype: str

    def as_dict(self) -> dict:
        return asdict(self)


def describe(model: nn.Module) -> MoEDescription:
    family = family_of(model)
    layers = moe_layers(model)
    first = layers[0]
    expert_tensors = fused_expert_params(first.experts)
    E = num_experts(first)
    per_expert = sum(t.numel() for t in expert_tensors.values()) // E
    dtype = next(iter(expert_tensors.values())).dtype
    n_layers = len(model.model.layers)
    moe_indices = [layer.index for layer in layers]
    return MoEDescription(
        family=family.name,
        router=family.scoring,
        gate_value=family.gate_value,
        moe_layers=moe_indices,
        dense_layers=[i for i in range(n_layers) if i not in moe_indices],
        routed_experts_per_layer=E,
        top_k=top_k(first),
        shared_expert_params_per_layer=sum(p.numel() for m in first.shared for p in m.parameters()),
        params_per_expert=per_expert,
        bytes_per_expert=per_expert * dtype.itemsize,
        routed_expert_params=per_expert * E * len(layers),
        total_params=sum(p.numel() for p in model.parameters()),
        total_bytes=sum(p.numel() * p.dtype.itemsize for p in model.parameters()),
        dtype=str(dtype).removeprefix("torch."),
    )


def format_description(d: MoEDescription) -> str:
    def size(n: int) -> str:
        for unit in ("", "K", "M", "G", "T"):
            if abs(n) < 1000:
                return f"{n:.4g}{unit}"
            n /= 1000
        return f"{n:.4g}P"

    def span(indices: list[int]) -> str:
        return f"{len(indices)} ({indices[0]}..{indices[-1]})" if indices else "0"

    rows = [
        ("family", d.family),
        ("router", d.router),
        ("gate value", d.gate_value),
        ("MoE layers", span(d.moe_layers)),
        ("dense layers", span(d.dense_layers)),
        ("routed experts / layer", str(d.routed_experts_per_layer)),
        ("top-k", str(d.top_k)),
        ("shared expert params / layer", size(d.shared_expert_params_per_layer)),
        ("params / expert", f"{size(d.params_per_expert)} ({size(d.bytes_per_expert)}B in {d.dtype})"),
        ("routed expert params",
         f"{size(d.routed_expert_params)} ({100 * d.routed_expert_params / d.total_params:.1f}% of the model)"),
        ("total params", f"{size(d.total_params)} ({size(d.total_bytes)}B)"),
    ]
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"{k:<{width}}  {v}" for k, v in rows)

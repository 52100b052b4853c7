"""ESFT adapters: only the trained tensors, in the reference naming, plus `expert_cfg.json`.

An adapter directory holds
- `expert_cfg.json`: the expert config (reference format);
- `model.safetensors`: the trained tensors. Routed experts use the family's per-expert checkpoint
  names (`model.layers.<l>.mlp.experts.<e>.{gate_proj,up_proj,down_proj}.weight` for DeepSeek,
  Qwen and OLMoE; `block_sparse_moe.experts.<e>.w1/w2/w3` for Mixtral; row slices of the fused
  tensors for GPT-OSS); shared experts and non-expert modules keep their parameter names.
  The safetensors metadata records the base model's identity.
Reference adapters (an `expert_cfg.json` and a `model.safetensors` with the same names) load the
same way.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import nn

from esft.errors import EsftError
from esft.families import Family, family_of, fused_expert_params, join_expert, moe_layers, num_experts, split_expert
from esft.io import atomic_directory
from esft.select import CONFIG_FILENAME, ExpertConfig, load_expert_config
from esft.trainable import TRAINABLE_PREFIX, apply_expert_config, is_selective, trained_rows, validate_expert_config

WEIGHTS_FILENAME = "model.safetensors"
ADAPTER_FORMAT = "esft-adapter/1"


class AdapterError(EsftError):
    """An adapter does not match the model it is applied to, or cannot be read."""


def _model_identity(model: nn.Module) -> dict[str, str]:
    layers = moe_layers(model)
    return {
        "format": ADAPTER_FORMAT,
        "base_model": str(getattr(model.config, "_name_or_path", "") or ""),
        "family": family_of(model).name,
        "moe_layers": ",".join(str(layer.index) for layer in layers),
        "num_experts": str(num_experts(layers[0])),
    }


def adapter_tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    """Every trained tensor of a model prepared by `apply_expert_config`, by checkpoint name, in the
    model's own dtype (so the adapter's size is the trained experts' bytes)."""
    family = family_of(model)
    tensors: dict[str, torch.Tensor] = {}
    for layer in moe_layers(model):
        if not is_selective(layer.experts):
            continue
        ids, rows = trained_rows(layer.experts)
        for slot, expert in enumerate(ids):
            per_expert = {name: rows[name][slot].to(getattr(layer.experts, name).dtype) for name in rows}
            tensors.update(split_expert(family, layer.index, expert, per_expert))
    for name, param in model.named_parameters():
        if param.requires_grad and TRAINABLE_PREFIX not in name:
            tensors[name] = param
    return {name: t.detach().contiguous().cpu() for name, t in tensors.items()}


def save_adapter(model: nn.Module, out_dir: str | Path, config: ExpertConfig, overwrite: bool = False) -> Path:
    """Write the adapter of a trained model (atomically: the directory appears complete or not at all)."""
    tensors = adapter_tensors(model)
    if not tensors:
        raise AdapterError("the model has no trained tensors; call apply_expert_config before training")
    with atomic_directory(out_dir, overwrite=overwrite) as tmp:
        save_file(tensors, tmp / WEIGHTS_FILENAME, metadata=_model_identity(model))
        config.save(tmp / CONFIG_FILENAME)
    return Path(out_dir)


def _expected_shapes(model: nn.Module, family: Family, config: ExpertConfig) -> dict[str, tuple[int, ...]]:
    """Checkpoint name -> shape of every routed-expert tensor `config` trains in `model`."""
    shapes = {}
    for layer in moe_layers(model):
        fused = fused_expert_params(layer.experts)
        for expert in config.experts_of(layer.index):
            rows = {name: tensor[expert] for name, tensor in fused.items()}
            shapes.update({k: tuple(v.shape) for k, v in split_expert(family, layer.index, expert, rows).items()})
    return shapes


def _parameter_kinds(model: nn.Module) -> dict[str, str]:
    """Parameter name -> "routed" (fused expert tensors), "shared" (shared experts) or
    "non_expert" (everything else), the split `apply_expert_config` trains by."""
    layers = moe_layers(model)
    routed = {id(p) for layer in layers for p in layer.experts.parameters()}
    shared = {id(p) for layer in layers for module in layer.shared for p in module.parameters()}
    return {
        name: "routed" if id(p) in routed else "shared" if id(p) in shared else "non_expert"
        for name, p in model.named_parameters()
    }


def _check_declared(name: str, kind: str | None, config: ExpertConfig, adapter_dir: Path) -> None:
    """An adapter carries only what its expert config trains: a tensor it does not declare would
    silently replace the base model's (e.g. embeddings from an adapter that says it trains none)."""
    if kind == "routed":
        raise AdapterError(f"adapter {adapter_dir} holds the whole fused tensor {name!r}; an ESFT adapter holds only "
                           "the selected experts' tensors, by per-expert name (write it with save_adapter)")
    if kind == "shared" and not config.shared_experts:
        raise AdapterError(f"adapter {adapter_dir} holds the shared-expert tensor {name!r} but its {CONFIG_FILENAME} "
                           "says shared_experts: false; remove the tensor or set the flag if it was trained")
    if kind == "non_expert" and not config.non_expert_modules:
        raise AdapterError(f"adapter {adapter_dir} holds the non-expert tensor {name!r} but its {CONFIG_FILENAME} "
                           "says non_expert_modules: false; remove the tensor or set the flag if it was trained")


def _read_adapter(adapter_dir: Path) -> tuple[ExpertConfig, dict[str, torch.Tensor], dict[str, str]]:
    weights = adapter_dir / WEIGHTS_FILENAME
    if not weights.exists():
        raise AdapterError(f"{adapter_dir} is not an ESFT adapter: {WEIGHTS_FILENAME} is missing")
    config = load_expert_config(adapter_dir / CONFIG_FILENAME)
    try:
        with safe_open(weights, framework="pt") as handle:  # safetensors only: nothing is unpickled
            metadata = handle.metadata() or {}
            tensors = {key: handle.get_tensor(key) for key in handle.keys()}
    except (SafetensorError, OSError) as error:  # an empty, truncated or tampered file (or an unreadable one)
        reason = str(error).partition("\n")[0]
        raise AdapterError(f"{weights} is not a readable safetensors file ({reason}); the adapter "
                           "is truncated or corrupted: copy it again or re-export it (esft train writes it)") from error
    return config, tensors, metadata


def check_adapter(model: nn.Module, adapter_dir: str | Path) -> tuple[ExpertConfig, dict[str, torch.Tensor]]:
    """Validate an adapter against `model` without changing the model; return its config and tensors.
    Every mismatch (family, expert count, layers, names, shapes) is a one-line AdapterError."""
    adapter_dir = Path(adapter_dir)
    config, tensors, metadata = _read_adapter(adapter_dir)
    family = family_of(model)
    if metadata.get("family") and metadata["family"] != family.name:
        raise AdapterError(f"adapter {adapter_dir} was trained on a {metadata['family']} model, not {family.name}")
    E = num_experts(moe_layers(model)[0])
    if metadata.get("num_experts") and int(metadata["num_experts"]) != E:
        raise AdapterError(f"adapter {adapter_dir} is for {metadata['num_experts']} experts per layer; this model has {E}")
    try:
        validate_expert_config(model, config)
    except EsftError as error:  # SelectionError, UnsupportedModelError; a bug keeps its own type
        raise AdapterError(f"adapter {adapter_dir}: {error}") from error
    params = dict(model.named_parameters())
    expected = _expected_shapes(model, family, config)
    kinds = _parameter_kinds(model)
    for name, tensor in tensors.items():
        if name not in expected:
            _check_declared(name, kinds.get(name), config, adapter_dir)
        shape = expected.get(name) or (tuple(params[name].shape) if name in params else None)
        if shape is None:
            raise AdapterError(f"adapter {adapter_dir} holds {name!r}, which is neither a tensor of this {family.name} "
                               f"model nor an expert its {CONFIG_FILENAME} selects")
        if tuple(tensor.shape) != shape:
            raise AdapterError(f"adapter {adapter_dir}: {name} has shape {tuple(tensor.shape)}, the model expects {shape}")
    missing = sorted(set(expected) - set(tensors))
    if missing:
        raise AdapterError(f"adapter {adapter_dir} lacks {len(missing)} expert tensors its expert_cfg.json selects, "
                           f"e.g. {missing[0]}")
    return config, tensors


def load_adapter(model: nn.Module, adapter_dir: str | Path, master_dtype: torch.dtype | None = torch.float32) -> ExpertConfig:
    """Apply an adapter to a freshly loaded base model: the expert config is applied (so training can
    continue) and the trained values are copied in. Validates everything before changing the model."""
    config, tensors = check_adapter(model, adapter_dir)
    apply_expert_config(model, config, master_dtype=master_dtype)
    family = family_of(model)
    params = dict(model.named_parameters())
    with torch.no_grad():
        for layer in moe_layers(model):
            if not is_selective(layer.experts):
                continue
            ids, rows = trained_rows(layer.experts)
            for slot, expert in enumerate(ids):
                for name, value in join_expert(family, layer.index, expert, tensors).items():
                    rows[name][slot].copy_(value)
        expert_keys = set(_expected_shapes(model, family, config))
        for name, value in tensors.items():
            if name not in expert_keys:
                params[name].copy_(value)
    return config


def adapter_summary(adapter_dir: str | Path) -> dict:
    """Size and contents of an adapter, for logs and notes."""
    adapter_dir = Path(adapter_dir)
    config, tensors, metadata = _read_adapter(adapter_dir)
    return {
        "base_model": metadata.get("base_model", ""),
        "family": metadata.get("family", ""),
        "selected_experts": config.num_selected,
        "tensors": len(tensors),
        "bytes": (adapter_dir / WEIGHTS_FILENAME).stat().st_size,
        "expert_config": json.loads(config.to_json()),
    }

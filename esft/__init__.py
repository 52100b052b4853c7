"""Expert-Specialized Fine-Tuning (ESFT) for Mixture-of-Experts LLMs: the method, framework-light.

The public API is small: load or build an expert config, apply it to a model, train with any
loop, save/load/merge the adapter, and profile routing to choose experts.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from esft.adapter import load_adapter, save_adapter
    from esft.scores import ExpertScores, profile_batch
    from esft.select import ExpertConfig, load_expert_config, select_experts
    from esft.trainable import apply_expert_config, merge_adapter

# Imported on first use (PEP 562): importing any esft submodule (a Ray worker that only packs
# data imports esft.data) must not pay for torch and transformers' MoE integrations up front.
_EXPORTS = {
    "load_adapter": "esft.adapter", "save_adapter": "esft.adapter",
    "ExpertScores": "esft.scores", "profile_batch": "esft.scores",
    "ExpertConfig": "esft.select", "load_expert_config": "esft.select", "select_experts": "esft.select",
    "apply_expert_config": "esft.trainable", "merge_adapter": "esft.trainable",
}


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'esft' has no attribute {name!r}")
    return getattr(importlib.import_module(_EXPORTS[name]), name)


__all__ = [
    "ExpertConfig",
    "ExpertScores",
    "apply_expert_config",
    "load_adapter",
    "load_expert_config",
    "merge_adapter",
    "profile_batch",
    "save_adapter",
    "select_experts",
]

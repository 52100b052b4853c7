"""Expert-Specialized Fine-Tuning (ESFT) for Mixture-of-Experts LLMs: the method, framework-light.

The public API is small: load or build an expert config, apply it to a model, train with any
loop, save/load/merge the adapter, and profile routing to choose experts.
"""

from esft.adapter import load_adapter, save_adapter
from esft.scores import ExpertScores, profile_batch
from esft.select import ExpertConfig, load_expert_config, select_experts
from esft.trainable import apply_expert_config, merge_adapter

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

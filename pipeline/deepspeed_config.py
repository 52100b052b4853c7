"""DeepSpeed configs: the ZeRO presets we ship (configs/deepspeed/zero{0,1,2,3}.json are these,
serialised), and the fields our trainer always sets itself (batch sizes, clipping, precision)."""

from __future__ import annotations

import json
from pathlib import Path

from pipeline.config import ConfigError

PRESETS = ("zero0", "zero1", "zero2", "zero3")


def preset(name: str) -> dict:
    """A ZeRO preset. Stage 3 also partitions the frozen weights, for models that do not fit one
    device; stages 1-2 partition optimizer state (and gradients) of the trainable tensors only."""
    stage = PRESETS.index(name)
    zero: dict = {"stage": stage}
    if stage >= 2:
        zero.update({"overlap_comm": False, "contiguous_gradients": True})
    if stage == 3:
        zero.update({"stage3_gather_16bit_weights_on_model_save": False, "stage3_param_persistence_threshold": 0})
    return {"zero_optimization": zero, "steps_per_print": 10**9, "wall_clock_breakdown": False}


def load_deepspeed_config(spec: str) -> dict:
    """A preset name (zero0..zero3) or a JSON file."""
    if spec in PRESETS:
        return preset(spec)
    path = Path(spec)
    try:
        config = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as error:
        raise ConfigError(f"cannot read DeepSpeed config {spec!r}: {error}; use zero0..zero3 or a JSON file") from error
    if not isinstance(config, dict):
        raise ConfigError(f"DeepSpeed config {spec} must be a JSON object")
    return config


def finalize(config: dict, micro_batch: int, grad_accum: int, grad_clip: float, bf16: bool) -> dict:
    """Fill the fields the trainer owns. bf16 keeps fp32 master weights in DeepSpeed's optimizer."""
    return {
        **config,
        "train_micro_batch_size_per_gpu": micro_batch,
        "gradient_accumulation_steps": grad_accum,
        "gradient_clipping": grad_clip,
        "bf16": {"enabled": bf16},
        "fp16": {"enabled": False},
    }


def zero_stage(config: dict) -> int:
    return int(config.get("zero_optimization", {}).get("stage", 0))

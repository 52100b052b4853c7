"""The settings of one training run (`esft train`, a stage of `esft run`, a sweep trial), shared by
the driver (pipeline/train.py) and the Ray Train workers (pipeline/train_worker.py)."""

from __future__ import annotations

from dataclasses import dataclass

from esft.training import PAPER_LR
from pipeline.config import ConfigError

METHODS = ("esft", "fft", "lora")
EXPORT_DIR = {"esft": "adapter", "fft": "model", "lora": "lora"}
# Rank 0 appends its step lines here and the driver echoes them: Ray keeps workers' output off the
# driver's terminal (log_to_driver=False, which also keeps Ray's own chatter away).
PROGRESS_FILE = "progress.log"


@dataclass
class TrainConfig:
    model: str = ""
    data: str = ""
    out: str = ""
    expert_config: str | None = None
    method: str = "esft"
    workers: int = 1
    cpus_per_worker: int | None = None  # default: 1 with GPUs, else the cluster's CPUs shared evenly
    use_gpu: bool = False
    deepspeed: str = "zero2"
    steps: int = 500
    lr: float | None = None  # default: the paper's for the method
    batch_size: int = 4  # rows per worker per micro-step
    grad_accum: int = 1
    seq_len: int = 4096
    eval_every: int = 100
    save_every: int = 100
    seed: int = 0
    eval_data: str | None = None
    general_data: str | None = None
    resume: bool = False
    validation_fraction: float = 0.05
    eval_rows: int = 32  # rows of each evaluation set scored at every evaluation
    max_failures: int = 2
    template: str = "reference"
    tokenizer: str | None = None
    dtype: str = "auto"
    trust_remote_code: bool = False
    weight_decay: float = 0.1
    lora_rank: int = 8
    lora_alpha: int = 16

    @property
    def learning_rate(self) -> float:
        return self.lr if self.lr is not None else PAPER_LR[self.method]

    def validate(self) -> None:
        for name in ("model", "data", "out"):
            if not getattr(self, name):
                raise ConfigError(f"train: --{name.replace('_', '-')} is required")
        if self.method not in METHODS:
            raise ConfigError(f"train: unknown method {self.method!r}; use one of {', '.join(METHODS)}")
        if self.method == "esft" and not self.expert_config:
            raise ConfigError("train: --method esft needs --expert-config (make one with `esft select`)")
        for name in ("workers", "steps", "batch_size", "grad_accum", "seq_len", "eval_every", "save_every"):
            if int(getattr(self, name)) < 1:
                raise ConfigError(f"train: {name} must be a positive integer, got {getattr(self, name)!r}")
        if not 0 < self.validation_fraction < 1:
            raise ConfigError("train: validation_fraction must be in (0, 1)")
        if self.model.startswith("tiny:") and not self.tokenizer:
            raise ConfigError("train: built-in tiny models have no tokenizer; pass --tokenizer DIR")

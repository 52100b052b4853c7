"""Selective fine-tuning on Ray Train + DeepSpeed, with full fine-tuning and LoRA baselines.

    esft train --model MODEL --data train.jsonl --expert-config expert_cfg.json --out runs/train --workers 2

The driver tokenizes and packs the task data once (a held-out split for validation loss, and an
optional general-domain corpus whose loss tracks forgetting), puts the packed rows in Ray's object
store and starts a `TorchTrainer`. Every worker loads the model, makes trainable exactly what the
method says (ESFT: the expert config's rows; FFT: everything; LoRA: adapters), and hands only
those tensors to `deepspeed.initialize`. The rows a worker trains on at a step are a pure function
of (step, micro-step, rank), so a restarted or resumed run continues bit for bit.

Checkpoints (every --save-every steps): every rank saves its DeepSpeed state (trainable tensors,
its optimizer partition, the step and the metric history) and rank 0 adds an export (the ESFT
adapter, the LoRA adapter, or the full model), all reported through `ray.train.report`. They are
restored as data only (`weights_only=True` and a short allow-list, pipeline/checkpoint.py). With
`FailureConfig(max_failures)` Ray restarts dead workers from the latest checkpoint; `--resume`
continues an interrupted run in the same --out.

Output in --out: `adapter/` (ESFT; `lora/` for LoRA, `model/` for FFT), `metrics.json` (loss
curve, validation and general losses, tokens/s, trainable parameters, optimizer-state bytes,
wall time), `expert_cfg.json`, and `ray/` (Ray Train's run directory with the checkpoints).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import random
import shutil
import signal
import tempfile
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from esft.io import atomic_directory, atomic_write_text
from esft.training import PAPER_BETAS, PAPER_GRAD_CLIP, PAPER_LR
from pipeline.cluster import check_visible_from_every_node, ensure_ray, largest_node_cpus
from pipeline.config import ConfigError, absolute_local_paths
from pipeline.deepspeed_config import load_deepspeed_config

log = logging.getLogger("esft")

METHODS = ("esft", "fft", "lora")
EXPORT_DIR = {"esft": "adapter", "fft": "model", "lora": "lora"}
RUN_NAME = "train"
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


# ----------------------------------------------------------------------------- driver side


def _pack(conversations, tokenizer, config: TrainConfig, random_concat_ratio: float) -> np.ndarray:
    from esft.data import pack_samples, tokenize_conversations
    from pipeline.data import pad_id_of

    rows = pack_samples(tokenize_conversations(conversations, tokenizer, template=config.template), config.seq_len,
                        pad_id=pad_id_of(tokenizer), bos_id=tokenizer.bos_token_id,
                        random_concat_ratio=random_concat_ratio, seed=config.seed)
    return np.stack([np.asarray([r.input_ids, r.labels, r.attention_mask], np.int64) for r in rows])  # [N, 3, S]


def prepare_data(config: TrainConfig, tokenizer) -> dict[str, np.ndarray]:
    """Packed rows [N, 3 (ids, labels, mask), S] for train / validation / general."""
    from pipeline.data import load_conversations

    task = load_conversations(config.data)
    random.Random(config.seed).shuffle(task)
    if config.eval_data:
        train, valid = task, load_conversations(config.eval_data)
    else:
        held_out = max(1, int(len(task) * config.validation_fraction))
        if held_out >= len(task):
            raise ConfigError(f"train: {config.data} has {len(task)} conversations, "
                              "too few to hold out a validation split; pass --eval-data")
        train, valid = task[held_out:], task[:held_out]
    data = {"train": _pack(train, tokenizer, config, 0.2), "valid": _pack(valid, tokenizer, config, 0.0)}
    if config.general_data:
        data["general"] = _pack(load_conversations(config.general_data), tokenizer, config, 0.0)
    return data


def _check_cluster(config: TrainConfig) -> None:
    import ray

    resources = ray.cluster_resources()
    if config.use_gpu and resources.get("GPU", 0) < config.workers:
        raise ConfigError(f"train: {config.workers} GPU workers asked, the cluster has {resources.get('GPU', 0):g} GPUs")
    if resources.get("CPU", 0) < config.workers * config.cpus_per_worker:
        raise ConfigError(f"train: {config.workers} workers x {config.cpus_per_worker} CPUs asked, the cluster has "
                          f"{resources.get('CPU', 0):g} CPUs; lower --workers")
    if config.cpus_per_worker > largest_node_cpus():
        raise ConfigError(f"train: a worker x {config.cpus_per_worker} CPUs does not fit on any node of the Ray cluster "
                          f"(the largest has {largest_node_cpus():g} CPUs); lower cpus_per_worker")


def _validate_model(config: TrainConfig):
    """Check the model (structure only) and the expert config before anything runs."""
    from esft.model import load_skeleton

    skeleton = load_skeleton(config.model, trust_remote_code=config.trust_remote_code)
    if config.method == "esft":
        from esft.select import load_expert_config
        from esft.trainable import validate_expert_config

        expert_config = load_expert_config(config.expert_config)
        validate_expert_config(skeleton, expert_config)
        return expert_config
    from esft.families import moe_layers

    moe_layers(skeleton)
    return None


def run_train(config: TrainConfig, callbacks: list | None = None) -> dict:
    """Validate, prepare data, train on Ray, export the result into --out. Returns the metrics.
    `callbacks`: Ray Train callbacks for this run (a sweep forwards every report to its Tune trial)."""
    config.validate()
    absolute_local_paths(config, "model", "tokenizer", "expert_config")
    out = Path(config.out).resolve()
    if out.exists() and any(out.iterdir()) and not config.resume:
        raise FileExistsError(f"{out} already exists; pass --resume to continue that run, or choose another --out")
    if config.resume and not (out / "ray" / RUN_NAME).exists():
        raise ConfigError(f"train: --resume given but {out} holds no run to continue")
    if (out / "ray" / RUN_NAME).exists():
        from pipeline.checkpoint import check_run_checkpoints

        check_run_checkpoints(out / "ray" / RUN_NAME)  # a tampered checkpoint stops here, before any worker
    load_deepspeed_config(config.deepspeed)
    expert_config = _validate_model(config)
    from pipeline.data import cached_tokenizer

    tokenizer = cached_tokenizer(config.tokenizer or config.model, config.trust_remote_code)
    data = prepare_data(config, tokenizer)
    log.info("train: %s on %s, %d train / %d validation rows of %d tokens, %d worker(s), %s",
             config.method, config.model, len(data["train"]), len(data["valid"]), config.seq_len, config.workers,
             config.deepspeed)

    import ray
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    ensure_ray()
    if config.cpus_per_worker is None:
        cpus = ray.cluster_resources().get("CPU", 1)
        config.cpus_per_worker = 1 if config.use_gpu else max(1, min(int(cpus // config.workers), int(largest_node_cpus())))
    _check_cluster(config)
    check_visible_from_every_node(out, "train: the run directory")  # checkpoints cross nodes
    loop_config = {"train": asdict(config), "data": {k: ray.put(v) for k, v in data.items()},
                   "progress_file": str(out / PROGRESS_FILE)}
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config=loop_config,
        scaling_config=ScalingConfig(num_workers=config.workers, use_gpu=config.use_gpu,
                                     resources_per_worker={"CPU": config.cpus_per_worker,
                                                           **({"GPU": 1} if config.use_gpu else {})}),
        run_config=RunConfig(
            storage_path=str(out / "ray"),
            name=RUN_NAME,
            failure_config=FailureConfig(max_failures=config.max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=2),
            worker_runtime_env={"env_vars": _worker_env(config)},
            callbacks=callbacks,
        ),
    )
    started = time.perf_counter()
    with echo_progress(out / PROGRESS_FILE):
        result = fit_restoring_sigint(trainer)
    if result.error:
        raise RuntimeError(f"training failed: {result.error}")
    if result.checkpoint is None:
        raise RuntimeError("training finished without a checkpoint; nothing to export")
    metrics = _export(result.checkpoint.path, out, config, expert_config, time.perf_counter() - started)
    last = metrics["history"][-1]
    log.info("train: done, step %d, loss %.4f, validation loss %s -> %s", last["step"], last["loss"],
             metrics.get("final_valid_loss"), out / EXPORT_DIR[config.method])
    return metrics


@contextlib.contextmanager
def echo_progress(path: Path, poll_seconds: float = 0.5):
    """While the context is open, log every line rank 0 appends to `path` (lines already there from
    an earlier run of a resumed one are skipped), then the last ones when it closes."""
    offset = path.stat().st_size if path.exists() else 0
    done = threading.Event()

    def echo() -> None:
        nonlocal offset
        if path.exists():
            with open(path, "rb") as handle:  # bytes: `offset` is a byte position
                handle.seek(offset)
                while line := handle.readline():
                    if not line.endswith(b"\n"):  # half-written: read it whole next time
                        break
                    offset += len(line)
                    log.info("train: %s", line.decode("utf-8", errors="replace").rstrip("\n"))

    def poll() -> None:
        while not done.wait(poll_seconds):
            echo()

    thread = threading.Thread(target=poll, name="esft-train-progress", daemon=True)
    thread.start()
    try:
        yield
    finally:
        done.set()
        thread.join()
        echo()


def fit_restoring_sigint(trainer):
    """`trainer.fit()`, with Ctrl-C raised as KeyboardInterrupt and the caller's SIGINT handler put back.

    Ray Train (DataParallelTrainer._register_sigint_handler, Ray 2.60) installs its own SIGINT
    handler in the main thread and never restores the previous one: a later Ctrl-C (evaluation or
    registration in `esft run`) would only reach an aborted controller and be swallowed. On Ctrl-C
    its handler aborts the run and ends it with sys.exit(0), a SystemExit raised inside fit that
    would leave the CLI with no message. The checkpoints written so far stay: `--resume` continues."""
    if threading.current_thread() is not threading.main_thread():  # a Tune trial: Ray installs nothing
        return trainer.fit()
    previous = signal.getsignal(signal.SIGINT)
    try:
        return trainer.fit()
    except SystemExit as error:
        raise KeyboardInterrupt("training aborted by Ctrl-C") from error
    finally:
        if previous is not None:  # None: a handler not installed from Python, which cannot be restored
            signal.signal(signal.SIGINT, previous)


def _export(checkpoint_dir: str, out: Path, config: TrainConfig, expert_config, wall_seconds: float) -> dict:
    """Copy the final export out of the last checkpoint (atomically) and write metrics.json."""
    checkpoint = Path(checkpoint_dir)
    metrics = json.loads((checkpoint / "metrics.json").read_text())
    metrics["wall_seconds"] = wall_seconds
    target = out / EXPORT_DIR[config.method]
    with atomic_directory(target, overwrite=True) as tmp:
        shutil.copytree(checkpoint / "export", tmp, dirs_exist_ok=True)
    if expert_config is not None:
        expert_config.save(out / "expert_cfg.json")
    atomic_write_text(out / "metrics.json", json.dumps(metrics, indent=1))
    return metrics


def _worker_env(config: TrainConfig) -> dict[str, str]:
    return {"DS_ACCELERATOR": "cuda" if config.use_gpu else "cpu"}


# ----------------------------------------------------------------------------- worker side


def train_loop_per_worker(loop_config: dict) -> None:
    """One Ray Train worker: everything it needs is in `loop_config`."""
    import ray
    import ray.train

    config = TrainConfig(**loop_config["train"])
    os.environ.setdefault("DS_ACCELERATOR", "cuda" if config.use_gpu else "cpu")
    import torch

    context = ray.train.get_context()
    rank, world = context.get_world_rank(), context.get_world_size()
    torch.set_num_threads(config.cpus_per_worker)  # Ray starts workers with OMP_NUM_THREADS=1
    torch.manual_seed(config.seed)
    data = {name: ray.get(ref) for name, ref in loop_config["data"].items()}
    engine, trainable = _build_engine(config)
    device = engine.device

    step, history = _restore(engine, config)
    tokens_per_step = config.batch_size * config.grad_accum * world
    last_time = time.perf_counter()
    while step < config.steps:
        step += 1
        losses = []
        for micro in range(config.grad_accum):
            batch = _rows(data["train"], ((step - 1) * config.grad_accum + micro) * world + rank, config.batch_size, device)
            loss = engine(**batch).loss
            engine.backward(loss)
            engine.step()
            losses.append(float(loss.detach()))
        now = time.perf_counter()
        record = {"step": step, "loss": _mean_over_ranks(float(np.mean(losses)), device),
                  "tokens_per_second": tokens_per_step * config.seq_len / (now - last_time)}
        last_time = now
        if step % config.eval_every == 0 or step == config.steps:
            record["valid_loss"] = _evaluate(engine, data["valid"], config, rank, world, device)
            if "general" in data:
                record["general_loss"] = _evaluate(engine, data["general"], config, rank, world, device)
            last_time = time.perf_counter()  # evaluation is not training throughput
        history.append(record)
        if rank == 0:
            _log_progress(record, config, history, loop_config["progress_file"])
        # Only checkpoint steps report to Ray: a report is a barrier on every rank, and the history
        # travels inside the checkpoint anyway.
        if step % config.save_every == 0 or step == config.steps:
            _save_and_report(engine, trainable, config, step, history, rank, world, device)
            last_time = time.perf_counter()


def _rows(rows: np.ndarray, index: int, batch_size: int, device) -> dict:
    """Micro-batch number `index`: rows [index*B, (index+1)*B) of the packed set, cycling."""
    import torch

    picked = rows[[(index * batch_size + i) % len(rows) for i in range(batch_size)]]
    tensor = torch.from_numpy(picked).to(device)
    return {"input_ids": tensor[:, 0], "labels": tensor[:, 1], "attention_mask": tensor[:, 2]}


def _without_shared_memory_all_reduce() -> None:
    """CPU workers all-reduce through torch.distributed (gloo), not DeepSpeed's shared-memory op.
    That op is compiled on first use (minutes on a 2-core machine, a C++ compiler required), and a
    compile interrupted once (Ctrl-C, a killed worker) leaves torch's build lock behind, on which
    every later run then waits forever without a word."""
    import deepspeed.ops
    from deepspeed.ops.op_builder.cpu import ShareMemCommBuilder

    deepspeed.ops.__compatible_ops__[ShareMemCommBuilder.NAME] = False  # DeepSpeed's own "not available here"


def _build_engine(config: TrainConfig):
    import deepspeed
    import torch

    from esft.model import load_model
    from pipeline.checkpoint import use_safe_loading
    from pipeline.deepspeed_config import finalize, zero_stage

    bf16 = config.use_gpu and config.dtype in ("auto", "bfloat16")
    model = load_model(config.model, dtype="bfloat16" if bf16 else ("float32" if config.dtype == "auto" else config.dtype),
                       trust_remote_code=config.trust_remote_code)
    model = _prepare_method(model, config, bf16)
    ds_config = finalize(load_deepspeed_config(config.deepspeed), config.batch_size, config.grad_accum, PAPER_GRAD_CLIP, bf16)
    if zero_stage(ds_config) == 3:
        make_experts_zero3_leaves(model)
    model.train()
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=config.learning_rate, betas=PAPER_BETAS, weight_decay=config.weight_decay)
    if not config.use_gpu:
        _without_shared_memory_all_reduce()
    engine, *_ = deepspeed.initialize(model=model, model_parameters=trainable, optimizer=optimizer, config=ds_config)
    use_safe_loading(engine)  # checkpoints are data: never unpickle code from the run directory
    return engine, trainable


def make_experts_zero3_leaves(model) -> None:
    """ZeRO-3 gathers a module's parameters around that module's own forward and backward. Each
    experts module becomes a leaf: its tensors are fetched whole, and its trainable tensors' gradients
    are reduced together by one full backward hook, with zeros for experts no token reached on this
    rank, so every rank reduces the same tensors.

    That hook fires once the gradients of the module's inputs exist. When none of its inputs requires
    grad (the first MoE layer with selected experts, when nothing below it trains), PyTorch fires it
    as soon as the gradients of its *outputs* exist, before the selected experts' weight gradients:
    DeepSpeed reduces zeros and frees the gradient, and the real one then lands on a size-0 tensor
    ("The size of tensor a (0) must match the size of tensor b (32)"). So the hidden states entering
    an experts module that trains always require grad; the cost is that module's input gradient."""
    from deepspeed.utils import set_z3_leaf_modules

    from esft.families import moe_layers

    layers = moe_layers(model)
    set_z3_leaf_modules(model, list({type(layer.experts) for layer in layers}))
    for layer in layers:
        if any(p.requires_grad for p in layer.experts.parameters()):
            layer.experts.register_forward_pre_hook(_hidden_states_require_grad, prepend=True)


def _hidden_states_require_grad(module, args):
    import torch

    hidden = args[0]
    if torch.is_grad_enabled() and not hidden.requires_grad:
        return (hidden.detach().requires_grad_(True), *args[1:])
    return None


def _prepare_method(model, config: TrainConfig, bf16: bool):
    import torch

    if config.method == "esft":
        from esft.select import load_expert_config
        from esft.trainable import apply_expert_config

        # Under bf16 DeepSpeed keeps the fp32 master copies; otherwise ours are fp32 already.
        apply_expert_config(model, load_expert_config(config.expert_config), master_dtype=None if bf16 else torch.float32)
        return model
    if config.method == "fft":
        return model.requires_grad_(True)
    from esft.lora import apply_lora

    return apply_lora(model, rank=config.lora_rank, alpha=config.lora_alpha)


def _mean_over_ranks(value: float, device) -> float:
    import torch
    import torch.distributed as dist

    tensor = torch.tensor([value], dtype=torch.float64, device=device)
    if dist.is_initialized():
        dist.all_reduce(tensor)
        tensor /= dist.get_world_size()
    return float(tensor)


def _evaluate(engine, rows: np.ndarray, config: TrainConfig, rank: int, world: int, device) -> float:
    """Token-weighted mean loss over the first `eval_rows` rows, split across ranks."""
    import torch
    import torch.distributed as dist

    totals = torch.zeros(2, dtype=torch.float64, device=device)
    engine.eval()
    with torch.no_grad():
        for index in range(rank, min(len(rows), config.eval_rows), world):
            batch = _rows(rows, index, 1, device)
            tokens = int((batch["labels"][:, 1:] != -100).sum())
            if tokens:
                totals += torch.tensor([float(engine(**batch).loss) * tokens, tokens], dtype=torch.float64, device=device)
    engine.train()
    if dist.is_initialized():
        dist.all_reduce(totals)
    return float(totals[0] / totals[1]) if totals[1] else float("nan")


def _log_progress(record: dict, config: TrainConfig, history: list[dict], progress_file: str) -> None:
    """One step line, on the worker's output and appended to the run's progress file (which the
    driver echoes: `echo_progress`)."""
    rates = [r["tokens_per_second"] for r in history[-10:]]
    eta = (config.steps - record["step"]) * config.batch_size * config.grad_accum * config.seq_len / max(np.mean(rates), 1e-9)
    extra = "".join(f"  {k} {record[k]:.4f}" for k in ("valid_loss", "general_loss") if k in record)
    line = (f"step {record['step']}/{config.steps}  loss {record['loss']:.4f}{extra}  "
            f"{record['tokens_per_second']:.0f} tokens/s  ETA {eta:.0f}s")
    print(f"[esft train] {line}", flush=True)
    with open(progress_file, "a", encoding="utf-8") as handle:
        handle.write(line + "\n")


def _optimizer_state_bytes(engine, device) -> int:
    """Optimizer state over all ranks (each holds its own ZeRO partition)."""
    import torch
    import torch.distributed as dist

    inner = getattr(engine.optimizer, "optimizer", engine.optimizer)
    local = sum(t.numel() * t.element_size() for s in inner.state.values() for t in s.values() if torch.is_tensor(t))
    tensor = torch.tensor([local], dtype=torch.float64, device=device)
    if dist.is_initialized():
        dist.all_reduce(tensor)
    return int(tensor)


def _peak_memory_bytes(device) -> int:
    """Peak accelerator memory of this worker, or its peak resident set size on CPU."""
    import resource

    import torch

    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024  # Linux reports KiB


def _save_and_report(engine, trainable, config: TrainConfig, step: int, history: list[dict], rank: int, world: int,
                     device) -> None:
    import deepspeed
    import ray.train

    state_bytes = _optimizer_state_bytes(engine, device)
    with tempfile.TemporaryDirectory() as tmp:
        tmp_path = Path(tmp)
        engine.save_checkpoint(tmp, tag=f"step{step}", client_state={"step": step, "history": history},
                               exclude_frozen_parameters=True)
        # the export reads only the trained tensors (gathered whole under ZeRO-3; whole already elsewhere)
        with deepspeed.zero.GatheredParameters(trainable, modifier_rank=None):
            if rank == 0:
                _write_export(engine.module, config, tmp_path / "export")
                metrics = {
                    "method": config.method, "history": history,
                    "final_valid_loss": next((r["valid_loss"] for r in reversed(history) if "valid_loss" in r), None),
                    "final_general_loss": next((r["general_loss"] for r in reversed(history) if "general_loss" in r), None),
                    "trainable_parameters": sum(p.numel() for p in trainable),
                    "optimizer_state_bytes": state_bytes,
                    "tokens_per_second": float(np.mean([r["tokens_per_second"] for r in history])),
                    "peak_memory_bytes": _peak_memory_bytes(device),
                    "workers": world, "config": asdict(config),
                }
                atomic_write_text(tmp_path / "metrics.json", json.dumps(metrics))
        ray.train.report(history[-1], checkpoint=ray.train.Checkpoint.from_directory(tmp),
                         checkpoint_dir_name=f"checkpoint_{step:06d}")


def _write_export(module, config: TrainConfig, target: Path) -> None:
    if config.method == "esft":
        from esft.adapter import save_adapter
        from esft.select import load_expert_config

        save_adapter(module, target, load_expert_config(config.expert_config))
    else:  # FFT: the whole model; LoRA: the PEFT adapter directory
        module.save_pretrained(target)


def _restore(engine, config: TrainConfig) -> tuple[int, list[dict]]:
    """Continue from the run's latest checkpoint (after a worker failure or with --resume)."""
    import ray.train

    checkpoint = ray.train.get_checkpoint()
    if checkpoint is None:
        return 0, []
    with checkpoint.as_directory() as directory:
        path, client_state = engine.load_checkpoint(directory, tag=None, load_module_strict=False,
                                                    load_optimizer_states=True, load_lr_scheduler_states=True)
    if path is None:
        raise RuntimeError(f"no DeepSpeed state in checkpoint {checkpoint.path}")
    print(f"[esft train] resumed from step {client_state['step']} ({checkpoint.path})", flush=True)
    return int(client_state["step"]), list(client_state["history"])

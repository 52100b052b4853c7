"""Selective fine-tuning on Ray Train + DeepSpeed, with full fine-tuning and LoRA baselines: the driver.

    esft train --model MODEL --data train.jsonl --expert-config expert_cfg.json --out runs/train --workers 2

The driver checks the settings (pipeline/train_config.py), the model and the expert config before
anything runs, tokenizes and packs the task data once (a held-out split for validation loss, and an
optional general-domain corpus whose loss tracks forgetting), puts the packed rows in Ray's object
store, starts a `TorchTrainer` whose workers run pipeline/train_worker.py, echoes rank 0's step
lines, and exports the final checkpoint.

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
import threading
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np

from esft.io import atomic_directory, atomic_write_text
from pipeline.cluster import check_visible_from_every_node, ensure_ray, largest_node_cpus
from pipeline.config import ConfigError, absolute_local_paths
from pipeline.deepspeed_config import load_deepspeed_config
from pipeline.train_config import EXPORT_DIR, PROGRESS_FILE, TrainConfig
from pipeline.train_worker import train_loop_per_worker

log = logging.getLogger("esft")

RUN_NAME = "train"
CONTROLLER_POLL_SECONDS = "0.5"  # Ray Train's default is 2 s; a user's RAY_TRAIN_HEALTH_CHECK_INTERVAL_S wins


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
    # Ray Train's controller polls its workers every 2 s by default, and that poll is also how it sees a
    # finished run and each report (so a sweep's scheduler decides late): a faster poll ends every run sooner.
    os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", CONTROLLER_POLL_SECONDS)
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

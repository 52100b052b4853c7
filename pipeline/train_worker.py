"""The worker side of training: one Ray Train worker's loop (pipeline/train.py is the driver that
starts it). Every worker loads the model, makes trainable exactly what the method says (ESFT: the
expert config's rows; FFT: everything; LoRA: adapters), hands only those tensors to
`deepspeed.initialize`, trains on the rows the driver packed (a pure function of step, micro-step
and rank, so a restarted or resumed run continues bit for bit), evaluates, and checkpoints: its
DeepSpeed state, plus rank 0's export and metrics, reported through `ray.train.report`.
"""

from __future__ import annotations

import json
import os
import tempfile
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np

from esft.io import atomic_write_text
from esft.training import PAPER_BETAS, PAPER_GRAD_CLIP, answer_matches
from pipeline.deepspeed_config import load_deepspeed_config
from pipeline.train_config import TrainConfig


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
            record["valid_loss"], record["valid_answer_accuracy"] = _evaluate(engine, data["valid"], config, rank, world,
                                                                              device)
            if "general" in data:
                record["general_loss"] = _evaluate(engine, data["general"], config, rank, world, device)[0]
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


def _evaluate(engine, rows: np.ndarray, config: TrainConfig, rank: int, world: int, device) -> tuple[float, float]:
    """Over the first `eval_rows` rows, split across ranks: the token-weighted mean loss, and the share of
    answers the model gets exactly right under teacher forcing (`answer_matches`: greedy generation's exact
    match, from the same forward)."""
    import torch
    import torch.distributed as dist

    totals = torch.zeros(4, dtype=torch.float64, device=device)  # loss x tokens, tokens, answers matched, answers
    engine.eval()
    with torch.no_grad():
        for index in range(rank, min(len(rows), config.eval_rows), world):
            batch = _rows(rows, index, 1, device)
            tokens = int((batch["labels"][:, 1:] != -100).sum())
            if tokens:
                output = engine(**batch)
                matched, answers = answer_matches(output.logits, batch["labels"])
                totals += torch.tensor([float(output.loss) * tokens, tokens, matched, answers], dtype=torch.float64,
                                       device=device)
    engine.train()
    if dist.is_initialized():
        dist.all_reduce(totals)
    loss = float(totals[0] / totals[1]) if totals[1] else float("nan")
    return loss, float(totals[2] / totals[3]) if totals[3] else float("nan")


def _log_progress(record: dict, config: TrainConfig, history: list[dict], progress_file: str) -> None:
    """One step line, on the worker's output and appended to the run's progress file (which the
    driver echoes: `echo_progress`)."""
    rates = [r["tokens_per_second"] for r in history[-10:]]
    eta = (config.steps - record["step"]) * config.batch_size * config.grad_accum * config.seq_len / max(np.mean(rates), 1e-9)
    extra = "".join(f"  {k} {record[k]:.4f}" for k in ("valid_loss", "valid_answer_accuracy", "general_loss")
                    if k in record)
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
                    "final_valid_answer_accuracy": next((r["valid_answer_accuracy"] for r in reversed(history)
                                                         if "valid_answer_accuracy" in r), None),
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

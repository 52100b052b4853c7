"""ESFT vs full fine-tuning vs LoRA through the real trainer (Ray Train + DeepSpeed ZeRO-2).

    python bench/train.py [--steps 8] [--workers 1]
    python bench/train.py --methods fft esft --rounds 3     # ESFT's trainer step vs the limit, interleaved
    python bench/train.py --device cuda --model-config bench/configs/lite_layers.json --seq-len 4096 --batch-size 2 \
        --deepspeed zero2 zero3 --methods esft fft          # on a GPU, bf16 (bench/gpu_check.py)

Same model (the core benchmark's "large" DeepSeek-V2 shape), same packed data, same batch, one run
each of `esft train` with --method esft (token score, p = 0.2, profiled on the training data),
fft and lora. Ratios vs FFT (ARCHITECTURE §7): step time (median over steps after the first),
optimizer state, peak memory, exported checkpoint bytes (adapter vs whole model), and
`selected_expert_share` = selected experts' bytes / model bytes.

`step_time_esft_over_limit`: ESFT's trainer step over the limit (bench/train_step.py: every weight
frozen, activation gradients only, plain PyTorch), the limit timed in this process on the same
model and rows right after each round of trainer runs; the median over --rounds of the per-round
ratios, so that this machine's drift hits both alike.
"""

from __future__ import annotations

import sys
from pathlib import Path

# bench/profile.py shadows the standard library's `profile` module for scripts run from here.
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]

import argparse  # noqa: E402
import importlib.util  # noqa: E402
import json  # noqa: E402
import logging  # noqa: E402
import statistics  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402

import torch  # noqa: E402

from esft.data import pack_samples, read_conversations, tokenize_conversations  # noqa: E402
from esft.families import fused_expert_params, moe_layers  # noqa: E402
from esft.scores import empty_scores_for, layer_score_dict, profile_batch  # noqa: E402
from esft.select import select_experts  # noqa: E402
from esft.testing import tiny_model, tiny_tokenizer  # noqa: E402
from esft.demo import synthetic  # noqa: E402
from pipeline.train import EXPORT_DIR, TrainConfig, run_train  # noqa: E402

LARGE = dict(hidden_size=384, moe_intermediate_size=512, n_routed_experts=32, num_experts_per_tok=4,
             num_hidden_layers=4, first_k_dense_replace=0, num_attention_heads=4, num_key_value_heads=4)
SEQ_LEN, BATCH = 512, 4


def directory_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def prepare(root: Path, shape: dict, seq_len: int, batch: int, device: str, dtype: torch.dtype) -> tuple[Path, Path, Path, float]:
    """Data, a random model of `shape` (built on `device` in `dtype`), and its token p = 0.2 selection profiled
    on the training rows, as files; also the selected experts' share of the model's bytes."""
    corpus = synthetic.rows("math", 3000, seed=0)
    data = root / "task.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in corpus))
    tokenizer = tiny_tokenizer([m["content"] for row in corpus[:1000] for m in row["messages"]], vocab_size=1000)
    with torch.device(device):  # GPU shapes are too large to initialise on a CPU quickly
        model = tiny_model("deepseek_v2", vocab_size=len(tokenizer), dtype=dtype, **shape)
    model.save_pretrained(root / "model")
    tokenizer.save_pretrained(root / "model")
    rows = pack_samples(tokenize_conversations(read_conversations(data), tokenizer), seq_len,
                        pad_id=tokenizer.pad_token_id, bos_id=tokenizer.bos_token_id, random_concat_ratio=0.0)[:32]
    scores = empty_scores_for(model)
    for i in range(0, len(rows), batch):
        ids = torch.tensor([r.input_ids for r in rows[i:i + batch]], device=device)
        mask = torch.tensor([r.attention_mask for r in rows[i:i + batch]], device=device)
        profile_batch(model, ids, mask, into=scores)
    config = select_experts(layer_score_dict(scores.layers, scores.scores("token")), top_p=0.2)
    config.save(root / "expert_cfg.json")
    model_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    selected_bytes = sum(
        sum(t[e].numel() * t.element_size() for t in fused_expert_params(layer.experts).values())
        for layer in moe_layers(model) for e in config.experts_of(layer.index)
    )
    return root / "model", data, root / "expert_cfg.json", selected_bytes / model_bytes


def limit_step_seconds(model_dir: Path, data: Path, seq_len: int, batch: int, device: str, repeats: int = 5,
                       warmup: int = 2) -> float:
    """Median seconds of the limit's step (bench/train_step.py) on the saved model and one batch of the
    training rows, in this process."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    spec = importlib.util.spec_from_file_location("train_step", Path(__file__).parent / "train_step.py")
    train_step = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(train_step)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    rows = pack_samples(tokenize_conversations(read_conversations(data), tokenizer), seq_len,
                        pad_id=tokenizer.pad_token_id, bos_id=tokenizer.bos_token_id, random_concat_ratio=0.0)[:batch]
    model = AutoModelForCausalLM.from_pretrained(model_dir).to(device)
    step = train_step.limit_step(model, torch.tensor([r.input_ids for r in rows], device=device))
    times = []
    for i in range(warmup + repeats):
        start = time.perf_counter()
        step()
        if device != "cpu":
            torch.cuda.synchronize()
        if i >= warmup:
            times.append(time.perf_counter() - start)
    return statistics.median(times)


def step_seconds(metrics: dict) -> float:
    tokens = metrics["config"]["batch_size"] * metrics["config"]["grad_accum"] * metrics["workers"] * metrics["config"]["seq_len"]
    return statistics.median(tokens / r["tokens_per_second"] for r in metrics["history"][1:])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--model-config", type=Path, default=None,
                        help="the model's shape (a DeepSeek-V2 config.json's fields); default: the core benchmark's large shape")
    parser.add_argument("--seq-len", type=int, default=SEQ_LEN)
    parser.add_argument("--batch-size", type=int, default=BATCH)
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"], help="cuda: one GPU per worker, bf16")
    parser.add_argument("--deepspeed", nargs="+", default=["zero2"], help="ZeRO stages to run (each with every method)")
    parser.add_argument("--methods", nargs="+", default=["fft", "esft", "lora"], choices=["fft", "esft", "lora"])
    parser.add_argument("--rounds", type=int, default=1,
                        help="repeat the trainer runs this many times, timing the limit after each round (medians reported)")
    args = parser.parse_args(argv)
    if "fft" not in args.methods:
        parser.error("--methods must include fft: every ratio is against it")
    shape = LARGE
    if args.model_config:
        shape = {k: v for k, v in json.loads(args.model_config.read_text()).items() if k != "model_type"}
    dtype = torch.bfloat16 if args.device == "cuda" else torch.float32
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    import ray

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        model, data, expert_cfg, selected_share = prepare(root, shape, args.seq_len, args.batch_size, args.device, dtype)
        if args.device == "cuda":
            torch.cuda.empty_cache()  # the workers need the GPU this process prepared the model on
        ray.init(include_dashboard=False, logging_level=logging.WARNING)
        rounds = []
        for round_ in range(args.rounds):
            results = {}
            for stage in args.deepspeed:
                for method in args.methods:
                    out = root / f"{round_}-{stage}-{method}"
                    config = TrainConfig(model=str(model), data=str(data), expert_config=str(expert_cfg), out=str(out),
                                         method=method, workers=args.workers, steps=args.steps, save_every=args.steps,
                                         eval_every=args.steps, seq_len=args.seq_len, batch_size=args.batch_size, eval_rows=4,
                                         deepspeed=stage, use_gpu=args.device == "cuda")
                    metrics = run_train(config)
                    results[f"{stage}.{method}"] = {
                        "step_seconds": step_seconds(metrics),
                        "optimizer_state_bytes": metrics["optimizer_state_bytes"],
                        "peak_memory_bytes": metrics["peak_memory_bytes"],
                        "checkpoint_bytes": directory_bytes(out / EXPORT_DIR[method]),
                        "trainable_parameters": metrics["trainable_parameters"],
                    }
            results["limit_step_seconds"] = limit_step_seconds(model, data, args.seq_len, args.batch_size, args.device)
            rounds.append(results)
        ray.shutdown()

    def median(key: str, stage: str, method: str) -> float:
        return statistics.median(r[f"{stage}.{method}"][key] for r in rounds)

    ratios = {"selected_expert_share": selected_share}
    for stage in args.deepspeed:
        prefix = "" if stage == args.deepspeed[0] else f"{stage}."  # the first stage's ratios keep their historic names
        for method in (m for m in args.methods if m != "fft"):
            ratios[f"{prefix}step_time_{method}_over_fft"] = statistics.median(
                r[f"{stage}.{method}"]["step_seconds"] / r[f"{stage}.fft"]["step_seconds"] for r in rounds)
            if method == "esft":
                ratios[f"{prefix}step_time_esft_over_limit"] = statistics.median(
                    r[f"{stage}.esft"]["step_seconds"] / r["limit_step_seconds"] for r in rounds)
                for key, name in (("optimizer_state_bytes", "optimizer_state"), ("peak_memory_bytes", "peak_memory"),
                                  ("checkpoint_bytes", "checkpoint_bytes")):
                    ratios[f"{prefix}{name}_esft_over_fft"] = median(key, stage, "esft") / median(key, stage, "fft")
    print(json.dumps({
        "ratios": ratios,
        "raw": {"rounds": rounds},
        "config": {"model": {"family": "deepseek_v2", **shape}, "seq_len": args.seq_len, "batch_size": args.batch_size,
                   "steps": args.steps, "workers": args.workers, "rounds": args.rounds, "deepspeed": args.deepspeed,
                   "selection": "token p=0.2",
                   "device": args.device, "dtype": str(dtype).removeprefix("torch.")},
    }))
    return 0


if __name__ == "__main__":
    sys.exit(main())

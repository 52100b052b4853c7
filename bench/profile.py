"""Profiling throughput: our Ray Data pipeline vs the bare forward vs the reference's loop.

    python bench/profile.py [--tokens 262144] [--seq-len 256] [--batch-size 4]
    python bench/profile.py --device cuda --model-config bench/configs/lite_layers.json --tokens 1048576 \
        --seq-len 4096 --batch-size 8 --reference-tokens 0        # on a GPU (bench/gpu_check.py)

One process, one model (built from bench/configs/profile_model.json, saved with a tokenizer
trained on the corpus), one generated corpus. Tokens per second of:
  (a) bare_forward: the decoder stack alone under inference_mode, over the pipeline's own packed
      rows at the same batch size and length (no LM head, no routing capture): the limit;
  (b) pipeline: `run_profile` end to end on a local Ray (reading, tokenizing, packing, actor
      start-up and model load, routing capture, merging);
  (c) reference_loop: the reference profiler re-enacted: one sample per forward (batch 1, full
      model with labels), each MoE layer's routing appended to a per-layer text file, then the
      files parsed into scores;
  (d) bare_forward_per_core (CPU): the bare forward of (a) in the layout of the pipeline's default
      CPU replicas, one single-thread process per core, the batches dealt between them.
Prints (ARCHITECTURE §7) `pipeline_over_bare_forward` = (b)/(a), `pipeline_over_bare_forward_per_core`
= (b)/(d) and `pipeline_over_reference_loop` = (b)/(c). (a) and (b) use the same threads: the pipeline's
replicas share the cores, as one process's threads do in (a); (d) says how much of the pipeline's
lead over (a) is its layout.
"""

from __future__ import annotations

import sys
from pathlib import Path

# This file is named like the standard library's `profile` module, which torch and transformers
# import indirectly; take this script's folder off the import path so theirs is found.
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]

import argparse  # noqa: E402
import json  # noqa: E402
import logging  # noqa: E402
import os  # noqa: E402
import subprocess  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402
from transformers import AutoModelForCausalLM  # noqa: E402

from esft.data import pack_samples, read_conversations, tokenize_conversations  # noqa: E402
from esft.families import moe_layers  # noqa: E402
from esft.memory import keep_freed_memory  # noqa: E402
from esft.routing import routing_hooks  # noqa: E402
from esft.testing import save_shaped_model  # noqa: E402
from pipeline.profile import ProfileConfig, run_profile  # noqa: E402
from esft.demo import synthetic  # noqa: E402

CONFIG = Path(__file__).parent / "configs" / "profile_model.json"


def build_assets(root: Path, n_samples: int, shape: Path = CONFIG, device: str = "cpu",
                 dtype: torch.dtype = torch.float32) -> tuple[Path, Path]:
    """A generated math corpus and a random model of `shape` with a tokenizer trained on the corpus."""
    corpus = synthetic.rows("math", n_samples, seed=0)
    data = root / "task.jsonl"
    data.write_text("".join(json.dumps(row) + "\n" for row in corpus))
    texts = [m["content"] for row in corpus[:2000] for m in row["messages"]]
    return save_shaped_model(root / "model", json.loads(shape.read_text()), texts, device=device, dtype=dtype), data


def packed_batches(model_dir: Path, data: Path, seq_len: int, batch_size: int, tokens: int) -> list[torch.Tensor]:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    rows = pack_samples(tokenize_conversations(read_conversations(data), tokenizer), seq_len,
                        pad_id=tokenizer.pad_token_id, bos_id=tokenizer.bos_token_id, random_concat_ratio=0.0)
    ids = torch.tensor([r.input_ids for r in rows[: max(1, tokens // seq_len)]])
    return list(ids.split(batch_size))


def bare_forward(model, batches: list[torch.Tensor]) -> float:
    device = next(model.parameters()).device
    batches = [b.to(device) for b in batches]
    with torch.inference_mode():
        model.model(input_ids=batches[0])  # warm-up
        _synchronize(device)
        start = time.perf_counter()
        for batch in batches:
            model.model(input_ids=batch)
        _synchronize(device)  # kernels run asynchronously: time the work, not the launches
        seconds = time.perf_counter() - start
    return sum(b.numel() for b in batches) / seconds


def bare_forward_per_core(model_dir: Path, batches: list[torch.Tensor], root: Path, dtype: torch.dtype) -> float:
    """The same batches dealt round-robin to one single-thread process per core, all timed from one
    start signal: the bare forward in the layout of the pipeline's default CPU replicas (tokens/s)."""
    cores = os.cpu_count() or 1
    rows = root / "rows.npy"
    if not rows.exists():  # the same rows every round
        np.save(rows, torch.cat(batches).numpy(), allow_pickle=False)
    command = [sys.executable, __file__, "--bare-child", str(model_dir), str(rows), str(len(batches[0])),
               str(dtype).removeprefix("torch.")]
    children = [subprocess.Popen([*command, str(i), str(cores)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                                 env={**os.environ, "OMP_NUM_THREADS": "1"}) for i in range(cores)]
    for child in children:  # each loads its model and warms up, then waits for the others
        if child.stdout.readline().strip() != "ready":
            raise RuntimeError(f"a per-core bare-forward process failed (exit code {child.wait()}); see its stderr above")
    for child in children:
        child.stdin.write("go\n")
        child.stdin.flush()
    seconds = max(float(child.communicate()[0].strip()) for child in children)
    return sum(b.numel() for b in batches) / seconds


def _bare_child(model_dir: str, rows: str, batch_size: int, dtype: str, index: int, of: int) -> None:
    torch.set_num_threads(1)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=getattr(torch, dtype)).eval()
    batches = list(torch.from_numpy(np.load(rows, allow_pickle=False)).split(batch_size))[index::of]
    with torch.inference_mode():
        model.model(input_ids=batches[0])  # warm-up
        print("ready", flush=True)
        sys.stdin.readline()
        start = time.perf_counter()
        for batch in batches:
            model.model(input_ids=batch)
        print(time.perf_counter() - start, flush=True)


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def reference_loop(model, model_dir: Path, data: Path, tokens: int, log_dir: Path) -> float:
    """The reference's get_expert_scores.py, re-enacted: per sample forward, routing logged to
    text files by the model, then parsed."""
    from transformers import AutoTokenizer

    from esft.data import format_reference

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    layers = moe_layers(model)
    top_k, n_experts = layers[0].router.top_k, layers[0].experts.num_experts
    handles = {layer.index: open(log_dir / f"expert_weights_{layer.index}.txt", "w") for layer in layers}

    def log_routing(index, ids, weights):
        for token_ids, token_weights in zip(ids.tolist(), weights.tolist()):
            handles[index].write("\t".join(map(str, token_ids)) + "\t\t" + "\t".join(map(str, token_weights)) + "\n")

    start = time.perf_counter()
    done = 0
    with torch.no_grad(), routing_hooks(model, log_routing, layers):
        for conversation in read_conversations(data):
            sample = format_reference(conversation, tokenizer)
            input_ids = torch.tensor(sample.input_ids).unsqueeze(0)
            model(input_ids=input_ids, labels=torch.tensor(sample.labels).unsqueeze(0))
            done += len(sample.input_ids)
            if done >= tokens:
                break
    for handle in handles.values():
        handle.close()
    for index in handles:  # the reference's summary step
        gate, token = np.zeros(n_experts), np.zeros(n_experts)
        for line in open(log_dir / f"expert_weights_{index}.txt"):
            ids, weights = line.split("\t\t")
            for e, w in zip(map(int, ids.split("\t")), map(float, weights.split("\t"))):
                gate[e] += w
                token[e] += 1.0 / top_k
    return done / (time.perf_counter() - start)


def pipeline_throughput(model_dir: Path, data: Path, out: Path, args: argparse.Namespace):
    """`run_profile` end to end on a fresh local Ray (its start-up not counted): tokens/s and the result."""
    import ray

    ray.init(num_cpus=os.cpu_count(), include_dashboard=False, logging_level=logging.WARNING, log_to_driver=False)
    try:
        start = time.perf_counter()
        result = run_profile(ProfileConfig(model=str(model_dir), data=[str(data)], out=str(out),
                                           n_sample_tokens=args.tokens, seq_len=args.seq_len, batch_size=args.batch_size,
                                           replicas=args.replicas, gpus_per_replica=1.0 if args.device == "cuda" else 0.0))[0]
        return result.scores.total_tokens / (time.perf_counter() - start), result
    finally:
        ray.shutdown()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=262144)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--reference-tokens", type=int, default=8192,
                        help="the reference loop is slow; time it on fewer tokens (0: skip it)")
    parser.add_argument("--model-config", type=Path, default=CONFIG, help="the model's shape (a config.json's fields)")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"],
                        help="cuda: one GPU replica in the pipeline, the bare forward on the same GPU")
    parser.add_argument("--dtype", default=None, choices=["float32", "bfloat16"], help="default: float32 on CPU, bfloat16 on GPU")
    parser.add_argument("--replicas", type=int, default=None,
                        help="the pipeline's model replicas (default: the product's; CPU replicas share the cores)")
    parser.add_argument("--bare-child", nargs=6, help=argparse.SUPPRESS)
    parser.add_argument("--rounds", type=int, default=3, help="pipeline and bare forward measured side by side this many times")
    args = parser.parse_args(argv)
    keep_freed_memory()  # the limit: the bare forward without re-faulting its temporaries, as the replicas run
    if args.bare_child:
        model_dir, rows, batch_size, dtype, index, of = args.bare_child
        _bare_child(model_dir, rows, int(batch_size), dtype, int(index), int(of))
        return 0
    dtype = getattr(torch, args.dtype or ("bfloat16" if args.device == "cuda" else "float32"))
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        model_dir, data = build_assets(root, n_samples=max(2000, args.tokens // 20), shape=args.model_config,
                                       device=args.device, dtype=dtype)
        batches = packed_batches(model_dir, data, args.seq_len, args.batch_size, args.tokens)
        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype).to(args.device).eval()
        rounds = []
        for i in range(args.rounds):  # interleaved, the order alternating: this machine's speed drifts
            measured = {}
            variants = ["pipeline", "bare_forward"] + (["bare_forward_per_core"] if args.device == "cpu" else [])
            for variant in (variants if i % 2 == 0 else variants[::-1]):
                if variant == "bare_forward":
                    measured["bare_forward"] = bare_forward(model, batches)
                elif variant == "bare_forward_per_core":
                    measured["bare_forward_per_core"] = bare_forward_per_core(model_dir, batches, root, dtype)
                else:
                    measured["pipeline"], result = pipeline_throughput(model_dir, data, root / f"profile{i}", args)
            measured["ratio"] = measured["pipeline"] / measured["bare_forward"]
            if "bare_forward_per_core" in measured:
                measured["ratio_per_core"] = measured["pipeline"] / measured["bare_forward_per_core"]
            rounds.append(measured)
            print(f"round {i + 1}/{args.rounds}: " + ", ".join(f"{k} {v:.3f}" if k.startswith("ratio") else f"{k} {v:.0f} tok/s"
                                                              for k, v in measured.items()), file=sys.stderr)
        reference = None
        if args.reference_tokens:
            (root / "ref").mkdir()
            reference = reference_loop(model, model_dir, data, args.reference_tokens, root / "ref")

    pipeline, bare = (float(np.median([r[k] for r in rounds])) for k in ("pipeline", "bare_forward"))
    per_core = [r["bare_forward_per_core"] for r in rounds if "bare_forward_per_core" in r]
    print(json.dumps({
        "ratios": {
            "pipeline_over_bare_forward": float(np.median([r["ratio"] for r in rounds])),  # median of the rounds' ratios
            **({"pipeline_over_bare_forward_per_core": float(np.median([r["ratio_per_core"] for r in rounds]))}
               if per_core else {}),
            **({"pipeline_over_reference_loop": pipeline / reference} if reference else {}),
        },
        "raw": {
            "tokens_per_second": {"bare_forward": bare, "pipeline": pipeline, "reference_loop": reference,  # medians
                                  **({"bare_forward_per_core": float(np.median(per_core))} if per_core else {})},
            "rounds": rounds,
            "pipeline_tokens": result.scores.total_tokens,
        },
        "config": {"model": json.loads(args.model_config.read_text()), "tokens": args.tokens, "seq_len": args.seq_len,
                   "batch_size": args.batch_size,
                   "replicas": args.replicas, "reference_tokens": args.reference_tokens, "rounds": args.rounds,
                   "cpus": os.cpu_count(), "device": args.device, "dtype": str(dtype).removeprefix("torch.")},
    }))
    return 0


if __name__ == "__main__":
    sys.exit(main())

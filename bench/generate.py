"""Evaluation's generation throughput: `esft eval` (Ray Data replicas) vs the same generation in one process.

    python bench/generate.py [--rows 64] [--max-new-tokens 32] [--batch-size 16]
    python bench/generate.py --device cuda --model-config bench/configs/lite_layers.json --rows 256 \
        --batch-size 64 --max-new-tokens 64                 # on a GPU (bench/gpu_check.py)

One random model of the given shape with a tokenizer trained on generated math rows (a random model never
emits a stop string, so rows generate up to `max_new_tokens` tokens). Tokens per second of:
  (a) in_process: pipeline.evaluate.Generator, the replica class itself, called on the batches in this
      process: the limit;
  (b) pipeline: `run_eval` end to end on a local Ray (actor start-up, model load, batching, scoring).
Prints `pipeline_over_in_process` = (b)/(a) (ARCHITECTURE §7), and both rates.
"""

from __future__ import annotations

import sys
from pathlib import Path

# bench/profile.py shadows the standard library's `profile` module for scripts run from here.
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]

import argparse  # noqa: E402
import json  # noqa: E402
import logging  # noqa: E402
import os  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from dataclasses import asdict  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402

from esft.demo import synthetic  # noqa: E402
from esft.testing import save_shaped_model  # noqa: E402
from pipeline.evaluate import EvalConfig, Generator, read_eval_rows, run_eval  # noqa: E402

CONFIG = Path(__file__).parent / "configs" / "profile_model.json"


def in_process_seconds(config: EvalConfig, prompts: list[str]) -> tuple[float, int]:
    """Generation by the replica class in this process, after one warm-up batch; and the number of tokens it
    generated (the pipeline generates the same: greedy decoding of the same model)."""
    generator = Generator(asdict(config), threads=os.cpu_count() or 1)
    batches = [prompts[i:i + config.batch_size] for i in range(0, len(prompts), config.batch_size)]

    def run(batch: list[str]) -> list[str]:
        out = generator({"index": np.arange(len(batch)), "prompt": np.asarray(batch, dtype=object)})
        return list(out["prediction"])

    run(batches[0])
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    start = time.perf_counter()
    predictions = [p for batch in batches for p in run(batch)]
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    return seconds, sum(len(ids) for ids in generator.tokenizer(predictions, add_special_tokens=False)["input_ids"])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=64)
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--model-config", type=Path, default=CONFIG, help="the model's shape (a config.json's fields)")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"], help="cuda: one GPU replica, bf16")
    args = parser.parse_args(argv)
    dtype = torch.bfloat16 if args.device == "cuda" else torch.float32
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    import ray

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        corpus = synthetic.rows("math", max(args.rows, 500), seed=0)
        save_shaped_model(root / "model", json.loads(args.model_config.read_text()),
                          [m["content"] for row in corpus for m in row["messages"]], device=args.device, dtype=dtype)
        if args.device == "cuda":
            torch.cuda.empty_cache()
        data = root / "eval.jsonl"
        data.write_text("".join(json.dumps(row) + "\n" for row in corpus[: args.rows]))
        config = EvalConfig(model=str(root / "model"), data=str(data), out=str(root / "metrics.json"), metric=["numeric"],
                            max_new_tokens=args.max_new_tokens, stop=[], batch_size=args.batch_size,
                            gpus_per_replica=1.0 if args.device == "cuda" else 0.0)
        prompts = [r["prompt"] for r in read_eval_rows(config.data)]
        direct_seconds, new_tokens = in_process_seconds(config, prompts)
        if args.device == "cuda":
            torch.cuda.empty_cache()  # the in-process model is gone; the pipeline's replica needs the GPU

        ray.init(num_cpus=os.cpu_count(), include_dashboard=False, logging_level=logging.WARNING, log_to_driver=False)
        metrics = run_eval(config)
        ray.shutdown()

    in_process, pipeline = new_tokens / direct_seconds, new_tokens / metrics["generation_seconds"]
    print(json.dumps({
        "ratios": {"pipeline_over_in_process": pipeline / in_process},
        "raw": {"new_tokens_per_second": {"in_process": in_process, "pipeline": pipeline},
                "in_process_seconds": direct_seconds, "pipeline_generation_seconds": metrics["generation_seconds"],
                "new_tokens": new_tokens},
        "config": {"model": json.loads(args.model_config.read_text()), "rows": args.rows, "max_new_tokens": args.max_new_tokens,
                   "batch_size": args.batch_size, "device": args.device, "dtype": str(dtype).removeprefix("torch."),
                   "cpus": os.cpu_count()},
    }))
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Is a forward slower on a worker thread than on a process's main thread? (issue: scale, profiling lead)

    python bench/forward_thread.py [--rounds 3] [--batches 100]

Ray Data calls a replica's `__call__` on a worker thread of the actor process, and the profiling
pipeline's forward measured ~25% slower there than the bare forward in a plain process. This
separates the two causes: the same model (bench/configs/profile_model.json, random weights) and the
same 4 x 256-token batches, 2 torch threads, timed in fresh processes (a) on the main thread and
(b) on a thread started for it (model loaded on the main thread, warm-up and timing on the new one,
as in a replica), plus (b) with glibc's malloc thresholds raised (no mmap / trim of large blocks).
The variants are interleaved over rounds (this machine is shared); prints one JSON object of
milliseconds per batch.
"""

from __future__ import annotations

import sys
from pathlib import Path

# This folder holds a `profile.py` that would shadow the standard library's module of that name.
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]

import argparse  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import statistics  # noqa: E402
import subprocess  # noqa: E402
import tempfile  # noqa: E402
import threading  # noqa: E402
import time  # noqa: E402

import torch  # noqa: E402

from esft.demo import synthetic  # noqa: E402
from esft.testing import save_shaped_model  # noqa: E402

SHAPE = Path(__file__).resolve().parent / "configs" / "profile_model.json"
VARIANTS = {"main_thread": ("main", {}), "worker_thread": ("worker", {}),
            "worker_thread_malloc_thresholds": ("worker", {"MALLOC_MMAP_THRESHOLD_": str(1 << 30),
                                                           "MALLOC_TRIM_THRESHOLD_": str(1 << 30)})}


def time_forwards(model_dir: str, batches: int, where: str) -> float:
    """Milliseconds per forward of the decoder stack over `batches` random 4 x 256 batches."""
    from transformers import AutoModelForCausalLM

    torch.set_num_threads(2)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    generator = torch.Generator().manual_seed(0)
    inputs = torch.randint(0, model.config.vocab_size, (batches, 4, 256), generator=generator)
    seconds: list[float] = []

    def run() -> None:
        torch.set_num_threads(2)  # per-thread OpenMP state, as a replica sets it on its calling thread
        with torch.inference_mode():
            model.model(input_ids=inputs[0])  # warm-up
            start = time.perf_counter()
            for batch in inputs:
                model.model(input_ids=batch)
            seconds.append(time.perf_counter() - start)

    if where == "main":
        run()
    else:
        thread = threading.Thread(target=run)
        thread.start()
        thread.join()
    return seconds[0] / batches * 1000


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--batches", type=int, default=100)
    parser.add_argument("--child", nargs=2, metavar=("MODEL_DIR", "WHERE"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(time_forwards(args.child[0], args.batches, args.child[1])))
        return 0
    with tempfile.TemporaryDirectory() as tmp:
        texts = [m["content"] for row in synthetic.rows("math", 2000, seed=0) for m in row["messages"]]
        model_dir = save_shaped_model(Path(tmp) / "model", json.loads(SHAPE.read_text()), texts)
        times: dict[str, list[float]] = {name: [] for name in VARIANTS}
        for _ in range(args.rounds):
            for name, (where, env) in VARIANTS.items():
                command = [sys.executable, __file__, "--batches", str(args.batches), "--child", str(model_dir), where]
                child = subprocess.run(command, env={**os.environ, **env}, capture_output=True, text=True, check=True)
                times[name].append(round(json.loads(child.stdout.strip().splitlines()[-1]), 1))
    medians = {name: statistics.median(values) for name, values in times.items()}
    print(json.dumps({"ratios": {f"{name}_over_main_thread": round(medians[name] / medians["main_thread"], 3)
                                 for name in VARIANTS if name != "main_thread"},
                      "ms_per_batch": times, "config": {"rounds": args.rounds, "batches": args.batches, "threads": 2,
                                                        "batch": [4, 256], "model": str(SHAPE.name)}}))
    return 0


if __name__ == "__main__":
    sys.exit(main())

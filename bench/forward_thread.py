"""Is a forward slower on a worker thread than on a process's main thread? (issue: scale, profiling lead)

    python bench/forward_thread.py [--rounds 3] [--batches 100]

Ray Data calls a replica's `__call__` on a worker thread of the actor process. This times the same
model (bench/configs/profile_model.json, random weights) over the same 4 x 256-token batches with 2
torch threads, in fresh processes, (a) on the main thread, (b) on a thread started for it after the
main thread loaded the model with 2 threads (OMP_NUM_THREADS=2), and (c) the same after a 1-thread
load (OMP_NUM_THREADS=1, what Ray gives a replica's process). Each OpenMP team belongs to the thread
that starts it: in (b) the process holds two teams, 3 OpenMP threads on 2 CPUs, and libgomp then
stops spin-waiting at its barriers (it throttles when it manages more threads than there are CPUs)
for every team. Freed memory is kept in the process (`esft.memory.keep_freed_memory`) in all three,
as in the replicas. Variants are interleaved over rounds (this machine is shared); prints one JSON
object of milliseconds and minor page faults (of the computing thread) per batch.
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
from esft.memory import keep_freed_memory  # noqa: E402
from esft.testing import save_shaped_model  # noqa: E402

SHAPE = Path(__file__).resolve().parent / "configs" / "profile_model.json"
# name: (the thread that computes, OMP_NUM_THREADS of the process: the main thread's torch threads while it loads)
VARIANTS = {"main_thread": ("main", 2), "worker_thread_two_teams": ("worker", 2), "worker_thread_one_team": ("worker", 1)}


def thread_minor_faults() -> int:
    stat = Path(f"/proc/self/task/{threading.get_native_id()}/stat").read_text()
    return int(stat[stat.rindex(")") + 2:].split()[7])


def time_forwards(model_dir: str, batches: int, where: str) -> tuple[float, float]:
    """Milliseconds and minor faults per forward of the decoder stack over `batches` random 4 x 256 batches."""
    from transformers import AutoModelForCausalLM

    keep_freed_memory()
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    generator = torch.Generator().manual_seed(0)
    inputs = torch.randint(0, model.config.vocab_size, (batches, 4, 256), generator=generator)
    seconds: list[float] = []
    faults: list[int] = []

    def run() -> None:
        torch.set_num_threads(2)  # per-thread OpenMP state, as a replica sets it on its calling thread
        with torch.inference_mode():
            model.model(input_ids=inputs[0])  # warm-up
            start, faulted = time.perf_counter(), thread_minor_faults()
            for batch in inputs:
                model.model(input_ids=batch)
            seconds.append(time.perf_counter() - start)
            faults.append(thread_minor_faults() - faulted)

    if where == "main":
        run()
    else:
        thread = threading.Thread(target=run)
        thread.start()
        thread.join()
    return seconds[0] / batches * 1000, faults[0] / batches


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
        faults: dict[str, list[float]] = {name: [] for name in VARIANTS}
        for _ in range(args.rounds):
            for name, (where, loading_threads) in VARIANTS.items():
                command = [sys.executable, __file__, "--batches", str(args.batches), "--child", str(model_dir), where]
                child = subprocess.run(command, env={**os.environ, "OMP_NUM_THREADS": str(loading_threads)},
                                       capture_output=True, text=True, check=True)
                milliseconds, faulted = json.loads(child.stdout.strip().splitlines()[-1])
                times[name].append(round(milliseconds, 1))
                faults[name].append(round(faulted))
    medians = {name: statistics.median(values) for name, values in times.items()}
    print(json.dumps({"ratios": {f"{name}_over_main_thread": round(medians[name] / medians["main_thread"], 3)
                                 for name in VARIANTS if name != "main_thread"},
                      "ms_per_batch": times, "minor_faults_per_batch": faults,
                      "config": {"rounds": args.rounds, "batches": args.batches, "threads": 2, "batch": [4, 256],
                                 "model": str(SHAPE.name)}}))
    return 0


if __name__ == "__main__":
    sys.exit(main())

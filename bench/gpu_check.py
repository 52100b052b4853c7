"""The GPU check: the pipeline's GPU path measured in one prepared run (about 6-8 minutes on one H200).

    python bench/gpu_check.py --out $OUT/gpu_check.json     # on a GPU machine, no downloads
    python bench/gpu_check.py --smoke --out /tmp/smoke.json  # the same steps on a CPU at tiny sizes

Random-init models built from configs at a real shape (bench/configs/lite_layers.json: DeepSeek-V2-Lite's
MoE layer, 64 experts of width 1408, top-6, 2 shared, MLA; four layers, 2.34B parameters), bf16. Each step
is its own bench script in its own process, with a time limit; a failing step is recorded, the others run.

1. core (bench/train_step.py --sizes lite): one training step of ESFT, FFT and the limit (only activation
   gradients) in one process, interleaved: the core's ESFT / FFT step time and the limit.
2. profile (bench/profile.py): Ray Data profiling with one GPU replica vs the bare forward on the same GPU.
3. trainer (bench/train.py): ESFT and FFT through Ray Train + DeepSpeed bf16 under ZeRO-2 and ZeRO-3, one
   GPU worker: step time, peak memory, optimizer state; its ESFT step over the core's limit and ESFT step
   (same shape, same tokens per step).
4. generate (bench/generate.py): `esft eval`'s generation (one GPU replica) vs the same generation in one
   process.

Writes one JSON object (ARCHITECTURE §7): `ratios` (each step's, prefixed by the step's name, plus the
cross-step `trainer_esft_over_core_limit` and `trainer_esft_over_core_esft`), `raw` (every step's whole
output, or its error), `config` (date, device, the commands).
"""

from __future__ import annotations

import sys
from pathlib import Path

# bench/profile.py shadows the standard library's `profile` module (torch imports it); keep this folder off the path.
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]

import argparse  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import platform  # noqa: E402
import subprocess  # noqa: E402
import time  # noqa: E402
from datetime import datetime, timezone  # noqa: E402

BENCH = Path(__file__).resolve().parent
LITE = BENCH / "configs" / "lite_layers.json"
SMALL = BENCH / "configs" / "profile_model.json"

# name -> (script arguments on a GPU, on a CPU smoke run, time limit in seconds on a GPU)
STEPS = {
    "core": (["train_step.py", "--device", "cuda", "--dtype", "bfloat16", "--sizes", "lite", "--repeats", "5"],
             ["train_step.py", "--sizes", "small", "--repeats", "2"], 120),
    "profile": (["profile.py", "--device", "cuda", "--model-config", str(LITE), "--tokens", "1048576", "--seq-len", "4096",
                 "--batch-size", "8", "--reference-tokens", "0"],
                ["profile.py", "--tokens", "8192", "--seq-len", "128", "--batch-size", "4", "--reference-tokens", "0"], 150),
    "trainer": (["train.py", "--device", "cuda", "--model-config", str(LITE), "--seq-len", "4096", "--batch-size", "2",
                 "--steps", "6", "--deepspeed", "zero2", "zero3", "--methods", "fft", "esft"],
                ["train.py", "--model-config", str(SMALL), "--seq-len", "128", "--batch-size", "2", "--steps", "3",
                 "--deepspeed", "zero2", "zero3", "--methods", "fft", "esft"], 300),
    "generate": (["generate.py", "--device", "cuda", "--model-config", str(LITE), "--rows", "256", "--batch-size", "64",
                  "--max-new-tokens", "64"],
                 ["generate.py", "--rows", "16", "--batch-size", "8", "--max-new-tokens", "8"], 120),
}


def run_step(name: str, arguments: list[str], limit: float, log_dir: Path) -> dict:
    """One bench script in its own process; its last stdout line is its JSON result."""
    log = log_dir / f"{name}.log"
    started = time.perf_counter()
    print(f"gpu_check: {name}: {' '.join(arguments)} (limit {limit:.0f} s)", flush=True)
    try:
        with log.open("w") as stderr:
            done = subprocess.run([sys.executable, str(BENCH / arguments[0]), *arguments[1:]], stdout=subprocess.PIPE,
                                  stderr=stderr, text=True, timeout=limit, cwd=BENCH.parent)
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {limit:.0f} s", "log_tail": log.read_text()[-2000:]}
    seconds = time.perf_counter() - started
    lines = done.stdout.strip().splitlines()
    if done.returncode != 0 or not lines:
        return {"error": f"exit code {done.returncode}", "seconds": seconds, "log_tail": log.read_text()[-2000:]}
    result = json.loads(lines[-1])
    print(f"gpu_check: {name}: done in {seconds:.0f} s: " + ", ".join(f"{k} {v:.3g}" for k, v in result["ratios"].items()),
          flush=True)
    return {**result, "seconds": seconds}


def cross_ratios(results: dict) -> dict:
    """The trainer's ESFT step against the core's, same shape and tokens per step (GPU runs only)."""
    core, trainer = results.get("core", {}), results.get("trainer", {})
    if "error" in core or "error" in trainer or "lite" not in core.get("raw", {}):
        return {}
    core_seconds = core["raw"]["lite"]["median_step_seconds"]
    esft = trainer["raw"]["zero2.esft"]["step_seconds"]
    return {"trainer_esft_over_core_limit": esft / core_seconds["limit"],
            "trainer_esft_over_core_esft": esft / core_seconds["esft"]}


def device_name(smoke: bool) -> str:
    if smoke:
        return f"cpu ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)"
    import torch

    return torch.cuda.get_device_name() if torch.cuda.is_available() else "no CUDA device"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True, help="where the JSON result goes (step logs beside it)")
    parser.add_argument("--smoke", action="store_true", help="run every step on the CPU at tiny sizes (checks the script)")
    parser.add_argument("--steps", nargs="+", choices=list(STEPS), default=list(STEPS))
    args = parser.parse_args(argv)
    if not args.smoke:
        import torch

        if not torch.cuda.is_available():
            parser.error("no CUDA device here; use --smoke to check the script on a CPU")
    log_dir = args.out.parent / f"{args.out.stem}-logs"
    log_dir.mkdir(parents=True, exist_ok=True)
    results, commands = {}, {}
    for name in args.steps:
        gpu, cpu, limit = STEPS[name]
        arguments = cpu if args.smoke else gpu
        commands[name] = " ".join(["python", f"bench/{arguments[0]}", *arguments[1:]])
        results[name] = run_step(name, arguments, limit * (4 if args.smoke else 1), log_dir)
    ratios = {f"{name}.{k}": v for name, result in results.items() for k, v in result.get("ratios", {}).items()}
    ratios.update(cross_ratios(results))
    output = {"ratios": ratios, "raw": results,
              "config": {"date": datetime.now(timezone.utc).isoformat(timespec="seconds"), "device": device_name(args.smoke),
                         "smoke": args.smoke, "commands": commands}}
    tmp = args.out.with_suffix(".tmp")
    tmp.write_text(json.dumps(output, indent=1))
    tmp.replace(args.out)
    print(json.dumps({"ratios": ratios, "failed": [n for n, r in results.items() if "error" in r]}))
    return 1 if any("error" in r for r in results.values()) else 0


if __name__ == "__main__":
    sys.exit(main())

"""Search + early stopping vs the grid, on the same budget of trials: Optuna's TPE with ASHA
(configs/sweep_asha.yaml: on validation answer accuracy) against the grid (configs/sweep.yaml), on the
embedded default.

    python bench/sweep.py                 # both shipped configs, 8 trials of 480 steps each (~25 min a round on 2 CPU cores)
    python bench/sweep.py --quick         # a tiny version (2 trials each, a few steps) that checks the script runs
    python bench/sweep.py --scheduler-metric valid_loss      # ASHA on validation loss instead
    python bench/sweep.py --steps 40 --eval-every 10         # short trials (the configs' length before 2026-12-02)

Each round runs both sweeps one after the other in one process and one Ray cluster, in fresh run
directories that share one profile (the order alternates between rounds; the searcher's seed is the
round's index, so rounds are independent searches); the searcher gets exactly as many trials as the grid
has points. Measured per sweep: Tune's wall time for all its trials (profiling and registration excluded,
both are the same for either), the best objective reached (the configs' objective: the task metric of the
evaluated trials on the embedded default's 64 eval rows), trials stopped early and selections reused.

The best objective is a maximum over noisy 64-row scores (one row moves it by 0.016), so each sweep's
chosen trial is also scored on 512 fresh eval rows (other prompts than the sweeps', one per prompt):
what a user gets from each search. `confirmed_search_minus_grid` is the mean paired difference on those
rows with a 95% bootstrap interval (rows resampled, the same draw for every round).

Ratios: wall_time_search_over_grid (goal <= 0.6) and best_objective_search_over_grid (goal >= 1 within
the grid's noise), means over rounds. Writes bench/results/sweep.json (--quick: runs/bench_sweep/quick.json)
and prints one JSON object last.
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
import shutil  # noqa: E402
import statistics  # noqa: E402

import numpy as np  # noqa: E402

from esft.demo import synthetic  # noqa: E402
from esft.io import atomic_write_text  # noqa: E402
from esft.metrics import PER_SAMPLE, clean_prediction  # noqa: E402
from pipeline.config import build_config, read_yaml  # noqa: E402
from pipeline.evaluate import EvalConfig, run_eval  # noqa: E402
from pipeline.run import EMBEDDED, embedded_inputs  # noqa: E402
from pipeline.tune import SweepConfig, run_sweep  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results" / "sweep.json"
VARIANTS = {"grid": ROOT / "configs" / "sweep.yaml", "search": ROOT / "configs" / "sweep_asha.yaml"}
# --quick: the same two sweeps shrunk until each trial takes seconds (it checks the script, it measures nothing).
CONFIRM_ROWS = 512  # fresh eval rows that score each sweep's chosen trial (--quick: 16)
BOOTSTRAP_DRAWS = 2000
QUICK = {"profile": {"n_sample_tokens": 1024, "seq_len": 64, "batch_size": 8},
         "train": {"workers": 1, "steps": 4, "batch_size": 2, "seq_len": 64, "eval_every": 2, "save_every": 2, "eval_rows": 4},
         "eval": {"max_new_tokens": 8}}


def load_variants(quick: bool, steps: int | None = None, eval_every: int | None = None,
                  scheduler_metric: str | None = None) -> dict[str, SweepConfig]:
    """Both shipped sweeps; `steps` / `eval_every` lengthen every trial of both (validation, checkpoints
    and ASHA's first rung at every `eval_every` steps); `scheduler_metric` replaces the search's ASHA metric."""
    configs = {name: build_config(SweepConfig, read_yaml(path), {}, where=str(path)) for name, path in VARIANTS.items()}
    for config in configs.values():
        config.register = {**config.register, "enabled": False}  # nothing to register: this compares searches
        if steps:
            config.train.update(steps=steps)
        if eval_every:
            config.train.update(eval_every=eval_every, save_every=eval_every)
            if config.scheduler:
                config.scheduler.update(grace_period=eval_every)
        if quick:
            for section, values in QUICK.items():
                getattr(config, section).update(values)
    if scheduler_metric:
        configs["search"].scheduler.update(metric=scheduler_metric)
        configs["search"].validate("bench/sweep.py")
    if quick:
        configs["grid"].search = {**configs["grid"].search, "token_top_p": [0.2], "gate_top_p": [0.1]}
        configs["search"].searcher.update(startup_trials=1)
        configs["search"].scheduler.update(grace_period=2)
    grid = configs["grid"].space()
    budget = len(grid.selections()) * max(1, len(grid.lr)) * len(grid.train_shared_experts)
    configs["search"].searcher["num_samples"] = budget  # the same budget of trials
    return configs


def confirm_data(path: Path, n: int, objective_data: str) -> Path:
    """`n` math eval rows with distinct prompts, none of them among the sweeps' own eval rows."""
    seen = {json.loads(line)["messages"][0]["content"] for line in Path(objective_data).read_text().splitlines() if line}
    rows = []
    for row in synthetic.rows("math", 4 * n, seed=1, split="eval"):
        prompt = row["messages"][0]["content"]
        if prompt not in seen:
            seen.add(prompt)
            rows.append(row)
        if len(rows) == n:
            break
    if len(rows) < n:
        raise SystemExit(f"bench/sweep.py: only {len(rows)} fresh eval prompts for {n} confirmation rows")
    atomic_write_text(path, "".join(json.dumps(r) + "\n" for r in rows))
    return path


def confirm(config: SweepConfig, best: dict | None, data: Path, out: Path) -> list[float] | None:
    """Per-row scores (the sweep's objective metric) of its chosen trial's adapter on the confirmation rows."""
    if best is None:
        return None
    metric = config.objective_spec(config.eval.get("metric", []))[0]
    if metric not in PER_SAMPLE:
        raise SystemExit(f"bench/sweep.py: the objective {metric!r} has no per-row score; the bench needs one of "
                         f"{', '.join(PER_SAMPLE)}")
    settings = {k: v for k, v in config.eval.items() if k != "general_data"}  # the sweep's own evaluation settings
    model = embedded_inputs(Path(config.run_dir) / "assets")["model"] if config.model == EMBEDDED else config.model
    run_eval(build_config(EvalConfig, settings, {
        "model": model, "tokenizer": config.tokenizer,
        "adapter": str(Path(best["work_dir"]) / "train" / "adapter"), "data": str(data), "out": str(out),
        "metric": [metric]}, where="bench/sweep.py: eval"))
    predictions = [json.loads(line) for line in out.with_suffix(".predictions.jsonl").read_text().splitlines()]
    return [float(PER_SAMPLE[metric](clean_prediction(r["prediction"]), r["answers"])) for r in predictions]


def measure(config: SweepConfig, out: Path, confirm_n: int) -> dict:
    summary = run_sweep(config)
    rows = summary["rows"]
    best = summary["best"]
    confirm_rows = out / f"confirm-{confirm_n}.jsonl"  # every sweep of this bench run scores the same rows
    if not confirm_rows.exists():
        confirm_data(confirm_rows, confirm_n, embedded_inputs(Path(config.run_dir) / "assets")["eval_data"])
    confirmed = confirm(config, best, confirm_rows, Path(config.run_dir) / "confirm.json")
    return {"fit_seconds": summary["fit_seconds"], "best_objective": best["objective"] if best else None,
            "confirmed": float(np.mean(confirmed)) if confirmed else None, "confirmed_rows": confirmed,
            "best_trial": best and {k: best[k] for k in ("score_function", "setting", "lr", "shared", "experts", "metric")},
            "trials": len(rows), "stopped_early": sum(r["status"].startswith("stopped early") for r in rows),
            "reused": sum(r["status"].startswith("same selection") for r in rows),
            "failed": sum(r["status"].startswith("failed") for r in rows),
            "rows": [{k: r[k]
                      for k in ("score_function", "setting", "lr", "shared", "experts", "objective", "valid_loss", "status")}
                     for r in rows]}


def confirmed_difference(raw: dict[str, list[dict]]) -> dict:
    """Search minus grid on the confirmation rows: the mean over rounds of each round's paired row difference,
    with a 95% bootstrap interval (one resampling of the rows applied to every round: all rounds score the
    same rows). The interval is the rows' noise given these rounds' searches, not how much another search
    seed would move the result: that shows in the per-round values. None where a sweep of some round
    finished no trial."""
    pairs = [(g["confirmed_rows"], s["confirmed_rows"]) for g, s in zip(raw["grid"], raw["search"])]
    if not pairs or any(g is None or s is None for g, s in pairs):
        return {"confirmed_grid": None, "confirmed_search": None, "confirmed_search_minus_grid": None,
                "confirmed_search_minus_grid_ci": None}
    differences = np.array([np.subtract(s, g) for g, s in pairs])  # rounds x rows
    draws = np.random.default_rng(0).integers(0, differences.shape[1], size=(BOOTSTRAP_DRAWS, differences.shape[1]))
    resampled = differences[:, draws].mean(axis=(0, 2))
    return {"confirmed_grid": float(np.mean([g for g, _ in pairs])), "confirmed_search": float(np.mean([s for _, s in pairs])),
            "confirmed_search_minus_grid": float(differences.mean()),
            "confirmed_search_minus_grid_ci": [float(v) for v in np.quantile(resampled, [0.025, 0.975])]}


def ratios(raw: dict[str, list[dict]]) -> dict:
    """The goals' ratios over all rounds: wall times and best objectives as means over rounds, and the
    confirmation rows' paired difference."""
    grid_time, search_time = mean([r["fit_seconds"] for r in raw["grid"]]), mean([r["fit_seconds"] for r in raw["search"]])
    grid_best, search_best = mean([r["best_objective"] for r in raw["grid"]]), mean([r["best_objective"] for r in raw["search"]])
    both = grid_best is not None and search_best is not None
    return {"wall_time_search_over_grid": search_time / grid_time,
            "best_objective_search_over_grid": search_best / grid_best if both and grid_best else None,
            "best_objective_search_minus_grid": search_best - grid_best if both else None,
            **confirmed_difference(raw)}


def combine(paths: list[Path]) -> dict:
    """One summary over the rounds of several runs of this bench with the same settings (e.g. a round added
    later with --first-round): their raw rounds together, the ratios recomputed."""
    runs = [json.loads(path.read_text()) for path in paths]
    same = [{k: v for k, v in run["config"].items() if k not in ("rounds", "searcher")} for run in runs]
    if any(settings != same[0] for settings in same):
        raise SystemExit("bench/sweep.py: --combine needs runs with the same settings (all but rounds and the seed)")
    raw = {name: [r for run in runs for r in run["raw"][name]] for name in ("grid", "search")}
    rounds = [r["round"] for r in raw["grid"]]
    if len(set(rounds)) != len(rounds):
        raise SystemExit(f"bench/sweep.py: --combine got round(s) twice: {sorted(rounds)}")
    return {"ratios": ratios(raw), "raw": raw,
            "config": {**runs[0]["config"], "rounds": len(rounds), "combined_from": [str(p) for p in paths]}}


def mean(values: list) -> float | None:
    values = [v for v in values if v is not None]
    return statistics.fmean(values) if values else None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=1, help="rounds of both sweeps; the order alternates")
    parser.add_argument("--first-round", type=int, default=0,
                        help="index of the first round (its order and searcher seed), to add rounds to an earlier run")
    parser.add_argument("--quick", action="store_true", help="tiny sweeps: checks the script, measures nothing")
    parser.add_argument("--steps", type=int, help="training steps of every trial (default: the configs')")
    parser.add_argument("--eval-every", type=int, help="validation / checkpoint / ASHA rung interval (default: the configs')")
    parser.add_argument("--scheduler-metric", help="the search's ASHA metric (default: configs/sweep_asha.yaml's), "
                        "e.g. valid_answer_accuracy")
    parser.add_argument("--out", default="runs/bench_sweep", help="run directories (one per sweep and round)")
    parser.add_argument("--results", help=f"JSON to write (default {RESULTS.relative_to(ROOT)}; --quick: OUT/quick.json)")
    parser.add_argument("--combine", type=Path, nargs="+", metavar="JSON",
                        help="run nothing: write one summary of these results files' rounds to --results")
    args = parser.parse_args(argv)
    if args.combine:
        if not args.results:
            raise SystemExit("bench/sweep.py: --combine needs --results")
        summary = combine(args.combine)
        Path(args.results).write_text(json.dumps(summary, indent=1, default=str))
        print(json.dumps(summary["ratios"]))
        return 0
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    os.environ.pop("MLFLOW_TRACKING_URI", None)  # each sweep keeps its own SQLite store in its run directory
    out = Path(args.out).resolve()
    configs = load_variants(args.quick, args.steps, args.eval_every, args.scheduler_metric)
    shared_profiles = out / "profiles"
    shared_profiles.mkdir(parents=True, exist_ok=True)
    raw: dict[str, list[dict]] = {"grid": [], "search": []}
    for round_index in range(args.first_round, args.first_round + args.rounds):
        order = ["grid", "search"] if round_index % 2 == 0 else ["search", "grid"]
        for name in order:
            config = configs[name]
            run = out / ("quick" if args.quick else "full") / f"round{round_index}-{name}"
            config.run_dir = str(run)
            if run.exists():
                shutil.rmtree(run)  # a fresh sweep, never a resumed one
            run.mkdir(parents=True)
            if not (run / "profiles").exists():
                (run / "profiles").symlink_to(shared_profiles)  # one profile for every sweep (its cache key is the same)
            if config.searcher:
                config.searcher["seed"] = round_index  # each round an independent search
            raw[name].append({"round": round_index, "searcher_seed": config.searcher.get("seed"),
                              **measure(config, out, 16 if args.quick else CONFIRM_ROWS)})
    summary = {
        "ratios": ratios(raw),
        "raw": raw,
        "config": {"quick": args.quick, "rounds": args.rounds, "trials_each": raw["grid"][0]["trials"],
                   "grid": str(VARIANTS["grid"].relative_to(ROOT)), "search": str(VARIANTS["search"].relative_to(ROOT)),
                   "model": configs["grid"].model, "train": configs["grid"].train, "eval": configs["grid"].eval,
                   "searcher": configs["search"].searcher, "scheduler": configs["search"].scheduler,
                   "objective": configs["grid"].objective, "max_concurrent_trials": configs["grid"].max_concurrent_trials,
                   "device": "cpu", "cpus": os.cpu_count()},
    }
    results = Path(args.results) if args.results else (out / "quick.json" if args.quick else RESULTS)
    results.parent.mkdir(parents=True, exist_ok=True)
    results.write_text(json.dumps(summary, indent=1, default=str))
    print(json.dumps(summary, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())

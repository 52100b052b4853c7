"""Replay finished sweeps' recorded validation curves through ASHA with other settings.

    python bench/asha_replay.py runs/bench_sweep_reuse/full/round0-search [more sweep run dirs] \
        [--grace 30 60] [--reduction-factor 2 3 4]

A sweep logs every trial's validation metric at each validation step to MLflow (its run directory's
`mlflow.db`). This feeds those curves, in the order the trials started, to the same ASHAScheduler that
`esft tune` builds (`pipeline.tune.make_scheduler`), once per grace period x reduction factor, and
reports where each trial would have stopped, which trials would have trained to the end and the best
objective among them. It answers "would a stricter (or looser) ASHA have saved time without losing
the trial that won?" without rerunning the sweep.

Exact for a sweep that ran one trial at a time with fixed proposals (a grid, or a searcher's trials
taken as they were proposed: a searcher that learnt from other stops would have proposed other trials
later on). A trial that the recorded sweep stopped before a rung that the replay lets it pass has no
curve beyond that point: it is reported as `>N?` and counted as neither stopped nor finished.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from mlflow import MlflowClient
from ray.tune.schedulers import TrialScheduler

from pipeline.sweep_config import SchedulerConfig
from pipeline.tune import make_scheduler


class _Trial:
    """What ASHAScheduler reads from a trial."""

    def __init__(self, trial_id: str):
        self.trial_id = trial_id


def recorded_sweep(run_dir: Path, metric: str | None = None) -> dict:
    """The last sweep logged in `run_dir`'s MLflow store: its scheduler settings and its trials in start order,
    each with its curve of `metric` (default: the one its scheduler watched, else validation loss) and objective."""
    client = MlflowClient(f"sqlite:///{run_dir / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("esft-sweeps")
    if experiment is None:
        raise SystemExit(f"asha_replay: {run_dir} holds no sweep (no esft-sweeps experiment in its mlflow.db)")
    runs = client.search_runs([experiment.experiment_id], order_by=["attributes.start_time ASC"])
    parents = [r for r in runs if r.data.tags.get("esft.kind") == "sweep"]
    if not parents:
        raise SystemExit(f"asha_replay: {run_dir} holds no sweep run")
    parent = parents[-1]
    scheduler = json.loads(parent.data.params.get("scheduler", "null") or "null") or {}
    if metric and metric != scheduler.get("metric", "valid_loss"):  # another metric: its mode follows it
        scheduler = {**scheduler, "metric": metric, "mode": None}
    scheduler.setdefault("metric", "valid_loss")  # a grid's record has no scheduler
    metric = scheduler["metric"]
    trials = []
    for run in runs:
        if run.data.tags.get("esft.kind") != "trial" or run.data.tags.get("mlflow.parentRunId") != parent.info.run_id:
            continue
        curve = {m.step: m.value for m in client.get_metric_history(run.info.run_id, metric)}
        losses = client.get_metric_history(run.info.run_id, "loss")
        trials.append({"trial_id": run.data.tags.get("esft.trial_id", run.info.run_id[:8]), "curve": curve,
                       "last_step": max((m.step for m in losses), default=0),
                       "early_stopped": run.data.tags.get("esft.early_stopped") == "true",
                       "objective": run.data.metrics.get("objective")})
    finished = [t["last_step"] for t in trials if not t["early_stopped"]]
    if not finished:
        raise SystemExit(f"asha_replay: no trial of {run_dir} trained to its end, so the number of steps is unknown")
    if not any(t["curve"] for t in trials):
        raise SystemExit(f"asha_replay: {run_dir}'s trials have no {metric} curve (a sweep from before it was logged?)")
    return {"run_dir": str(run_dir), "scheduler": scheduler, "steps": max(finished), "trials": trials}


def replay(sweep: dict, grace: int, reduction_factor: float) -> dict:
    """Each trial's fate under ASHA(grace, reduction_factor): the step it stops at, "full", or ">N?" (unknown)."""
    metric = sweep["scheduler"]["metric"]
    config = SchedulerConfig(metric=metric, mode=sweep["scheduler"].get("mode"), grace_period=grace,
                             reduction_factor=reduction_factor)
    scheduler = make_scheduler(config, {"steps": sweep["steps"], "eval_every": grace}, objective_mode="max")
    fates, steps_trained = [], 0
    for recorded in sweep["trials"]:
        trial = _Trial(recorded["trial_id"])
        scheduler.on_trial_add(None, trial)
        fate = None
        for step in sorted(recorded["curve"]):
            if scheduler.on_trial_result(None, trial, {"step": step, metric: recorded["curve"][step]}) == TrialScheduler.STOP:
                fate = step
                break
        if isinstance(fate, int):
            steps_trained += fate
        elif recorded["early_stopped"]:  # passed every rung it has a value for; its curve ends there
            fate = f">{recorded['last_step']}?"
            steps_trained += recorded["last_step"]
        else:
            fate = "full"
            steps_trained += sweep["steps"]
        fates.append(fate)
    finishers = [t["objective"] for t, fate in zip(sweep["trials"], fates) if fate == "full" and t["objective"] is not None]
    return {"grace": grace, "reduction_factor": reduction_factor, "fates": fates,
            "trained_to_the_end": fates.count("full"), "unknown": sum(isinstance(f, str) and f != "full" for f in fates),
            "steps_trained": steps_trained, "best_objective": max(finishers) if finishers else None}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("run_dirs", nargs="+", type=Path, help="sweep run directories (each with its mlflow.db)")
    parser.add_argument("--grace", type=int, nargs="+", help="grace periods to try (default: the sweep's own)")
    parser.add_argument("--reduction-factor", type=float, nargs="+", default=[2.0, 3.0, 4.0])
    parser.add_argument("--metric", help="replay this step metric instead of the recorded scheduler's (e.g. "
                        "valid_answer_accuracy; a grid's trials never stopped, so every curve is whole)")
    parser.add_argument("--json", type=Path, help="also write the replays here")
    args = parser.parse_args(argv)
    out = []
    for run_dir in args.run_dirs:
        sweep = recorded_sweep(run_dir, args.metric)
        own = (sweep["scheduler"].get("grace_period"), sweep["scheduler"].get("reduction_factor"))
        recorded_steps = sum(sweep["steps"] if not t["early_stopped"] else t["last_step"] for t in sweep["trials"])
        if not (args.grace or own[0]):
            raise SystemExit(f"asha_replay: {run_dir} ran without a scheduler; give --grace")
        recorded = f"ASHA grace {own[0]} / reduction factor {own[1]}" if own[0] else "no scheduler"
        print(f"\n{run_dir}: {len(sweep['trials'])} trials of {sweep['steps']} steps, recorded with {recorded}: "
              f"{recorded_steps} steps trained; replayed on {sweep['scheduler']['metric']}")
        print(f"{'grace':>5} {'rf':>4}  {'trained to the end':>18}  {'steps trained':>13}  {'best objective':>14}  "
              "fates (in start order)")
        replays = []
        for grace in args.grace or [own[0]]:
            for factor in args.reduction_factor:
                result = replay(sweep, grace, factor)
                replays.append(result)
                best = "n/a" if result["best_objective"] is None else f"{result['best_objective']:.4f}"
                unknown = f" (+{result['unknown']} unknown)" if result["unknown"] else ""
                print(f"{grace:>5} {factor:>4g}  {result['trained_to_the_end']:>18}  {result['steps_trained']:>13}  "
                      f"{best:>14}  {' '.join(str(f) for f in result['fates'])}{unknown}")
        out.append({"run_dir": str(run_dir), "steps": sweep["steps"], "recorded_steps_trained": recorded_steps,
                    "objectives": [t["objective"] for t in sweep["trials"]], "replays": replays})
    if args.json:
        args.json.write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()

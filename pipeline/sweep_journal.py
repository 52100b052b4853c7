"""A sweep's own record of its trials (`<run_dir>/sweep_trials.json`), and how a resumed sweep uses it.

Tune can restore an experiment, but only by unpickling what its directory holds (the tuner, the trial
states, the searcher's state): anyone who can write a run directory on shared storage could run code in the
driver. A sweep therefore never restores Tune's state. The driver writes this JSON journal instead (one entry
per trial: its config, whether it is running, finished, stopped early or failed, and its last result), and a
rerun of the same sweep starts a fresh Tune experiment from it:

- the grid runs only its points that no earlier trial completed;
- the searcher is told every completed trial (Optuna's study gets them as finished, pruned or failed trials,
  so it learns from them as if it had proposed them) and proposes the rest of `num_samples`;
- a trial that was still running when the driver died runs again with the same config first; its selection's
  work directory holds its checkpoints, so training continues where it stopped.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

from ray.tune import Callback

from esft.io import atomic_write_text

JOURNAL = "sweep_trials.json"
COMPLETED = ("finished", "stopped", "failed")


def _plain(values: dict) -> dict:
    """The JSON-able scalars of a Tune result (its own bookkeeping fields included; non-finite numbers as None)."""
    plain = {}
    for key, value in values.items():
        if isinstance(value, float) and not math.isfinite(value):
            plain[key] = None
        elif isinstance(value, (str, int, float, bool)) or value is None:
            plain[key] = value
    return plain


class TrialJournal(Callback):
    """Tune callback in the driver: each trial's start, result and end, rewritten atomically to the journal.
    Entries of earlier driver lives are kept; the driver is the only writer."""

    def __init__(self, run: Path, entries: dict[str, dict]):
        self.path = run / JOURNAL
        self.entries = entries

    def _save(self) -> None:
        atomic_write_text(self.path, json.dumps(self.entries, indent=1))

    def on_trial_start(self, iteration, trials, trial, **info):
        self.entries[trial.trial_id] = {"trial_id": trial.trial_id, "config": trial.config, "status": "running",
                                        "result": {}, "error": None}
        self._save()

    def on_trial_complete(self, iteration, trials, trial, **info):
        result = _plain(trial.last_result or {})
        self._end(trial, "finished" if result.get("evaluated") else "stopped", result, None)

    def on_trial_error(self, iteration, trials, trial, **info):
        error = trial.get_error()
        lines = [line for line in str(error).strip().splitlines() if line.strip("=-_ ")] if error else []
        self._end(trial, "failed", _plain(trial.last_result or {}), lines[-1] if lines else "unknown error")

    def _end(self, trial, status: str, result: dict, error: str | None) -> None:
        entry = self.entries.setdefault(trial.trial_id, {"trial_id": trial.trial_id, "config": trial.config})
        entry.update(status=status, result=result, error=error)
        self._save()


def load_journal(run: Path) -> dict[str, dict]:
    """The trials recorded by earlier lives of this sweep (empty for a new sweep). Plain JSON: nothing in it runs."""
    path = run / JOURNAL
    return json.loads(path.read_text()) if path.exists() else {}


def completed(entries: dict[str, dict]) -> list[dict]:
    return [e for e in entries.values() if e["status"] in COMPLETED]


def interrupted(entries: dict[str, dict]) -> list[dict]:
    """Trials that were running when the driver died: they run again, continuing from their checkpoints."""
    return [e for e in entries.values() if e["status"] == "running"]


def grid_point(config: dict) -> dict:
    """What identifies a point of the grid in a trial's config."""
    return {"selection": config["selection"], "lr": config.get("lr"), "train_shared_experts": config["train_shared_experts"]}


def remaining_grid(points: list[dict], entries: dict[str, dict]) -> list[dict]:
    """The grid's points that no earlier trial completed, in the grid's order (interrupted ones included)."""
    done = [grid_point(e["config"]) for e in completed(entries)]
    return [p for p in points if p not in done]


def optuna_params(config: dict) -> dict:
    """A trial's config as the Optuna parameters that `pipeline.tune.suggest_trial` draws (the inverse of it)."""
    selection = config["selection"]
    if "top_p" in selection:
        params = {"kind": selection["score_function"], f"{selection['score_function']}_top_p": selection["top_p"]}
    else:
        params = {"kind": f"{selection['score_function']}_budget", "experts_per_layer": selection["experts_per_layer"]}
    if config.get("lr") is not None:
        params["lr"] = config["lr"]
    params["train_shared_experts"] = config["train_shared_experts"]
    return params


def optuna_history(entries: dict[str, dict]) -> list[tuple[dict, float | None, str]]:
    """(parameters, objective, Optuna trial state) of every completed trial: finished ones with their objective
    (a non-finite one counts as failed), stopped ones pruned, failed ones failed."""
    history = []
    for entry in completed(entries):
        objective = entry["result"].get("objective")
        if entry["status"] == "finished" and isinstance(objective, (int, float)) and math.isfinite(objective):
            history.append((optuna_params(entry["config"]), float(objective), "COMPLETE"))
        else:
            history.append((optuna_params(entry["config"]), None, "PRUNED" if entry["status"] == "stopped" else "FAIL"))
    return history

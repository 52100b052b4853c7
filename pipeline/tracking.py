"""MLflow tracking of a sweep: one parent run, one nested run per trial, written by the driver.

Trials write their artifacts to disk and report numbers to Tune; this Tune callback, running in
the driver, turns each finished, early-stopped or failed trial into a nested MLflow run. A trial that
a scheduler stopped early is a finished run (not FAILED or KILLED: stopping it was the plan) tagged
`esft.early_stopped=true`, with its per-step history up to the step where it was stopped. A single writer keeps
the default SQLite store safe however many trials run at once, and a trial's run is looked up by
its `esft.trial_id` tag first, so a trial is never logged twice; a resumed sweep deletes the runs of the
trials it reruns (`forget`), so neither is a trial whose driver died around its logging.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

from ray.tune import Callback

TRIAL_TAG = "esft.trial_id"
EARLY_STOPPED_TAG = "esft.early_stopped"
PARENT_TAG = "mlflow.parentRunId"
STEP_METRICS = ("loss", "valid_loss", "valid_answer_accuracy", "general_loss", "tokens_per_second")


def start_parent_run(tracking_uri: str, experiment: str, artifact_root: Path | None, sweep_name: str, params: dict,
                     existing_run_id: str | None) -> str:
    """The sweep's parent run: reopened when the sweep resumes, created otherwise (`artifact_root`:
    where a new experiment keeps artifacts; None lets a tracking server decide)."""
    from mlflow import MlflowClient

    from pipeline.register import get_or_create_experiment

    client = MlflowClient(tracking_uri=tracking_uri)
    if existing_run_id:
        client.update_run(existing_run_id, status="RUNNING")
        return existing_run_id
    experiment_id = get_or_create_experiment(client, experiment, artifact_root)
    run = client.create_run(experiment_id, run_name=sweep_name, tags={"esft.kind": "sweep"})
    for key, value in params.items():
        client.log_param(run.info.run_id, key, str(value)[:6000])
    return run.info.run_id


def finish_parent_run(tracking_uri: str, run_id: str, metrics: dict[str, float], artifacts: list[Path], status: str) -> None:
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=tracking_uri)
    for key, value in metrics.items():
        if isinstance(value, (int, float)) and math.isfinite(value):
            client.log_metric(run_id, key, float(value))
    for path in artifacts:
        client.log_artifact(run_id, str(path))
    client.set_terminated(run_id, status=status)


def _numbers(values: dict) -> dict[str, float]:
    return {k: float(v) for k, v in values.items()
            if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(float(v))}


class SweepTracker(Callback):
    """Logs every trial of the sweep as a nested run of `parent_run_id`."""

    def __init__(self, tracking_uri: str, parent_run_id: str, base_model: str, data_hash: str):
        self.tracking_uri = tracking_uri
        self.parent_run_id = parent_run_id
        self.base_model = base_model
        self.data_hash = data_hash

    def _client(self):
        from mlflow import MlflowClient

        return MlflowClient(tracking_uri=self.tracking_uri)

    def _trial_filter(self, trial_id: str) -> str:
        """This sweep's run of a trial (the experiment holds every sweep's)."""
        return f"tags.`{TRIAL_TAG}` = '{trial_id}' and tags.`{PARENT_TAG}` = '{self.parent_run_id}'"

    def trial_run_id(self, trial_id: str) -> str | None:
        client = self._client()
        experiment_id = client.get_run(self.parent_run_id).info.experiment_id
        found = client.search_runs([experiment_id], filter_string=self._trial_filter(trial_id), max_results=1)
        return found[0].info.run_id if found else None

    def forget(self, trial_ids) -> int:
        """Delete the runs of trials the journal calls interrupted: a driver that died after logging a trial but
        before journaling it (or while logging it) left a run that the trial's rerun, under a new id, logs again.
        MLflow's delete is a soft one (the run stays restorable). Returns how many were deleted."""
        client = self._client()
        experiment_id = client.get_run(self.parent_run_id).info.experiment_id
        deleted = 0
        for trial_id in trial_ids:
            for run in client.search_runs([experiment_id], filter_string=self._trial_filter(trial_id)):
                client.delete_run(run.info.run_id)
                deleted += 1
        return deleted

    def _new_run(self, trial) -> str:
        client = self._client()
        experiment_id = client.get_run(self.parent_run_id).info.experiment_id
        selection = trial.config["selection"]
        run = client.create_run(experiment_id, run_name=f"trial-{trial.trial_id}", tags={
            PARENT_TAG: self.parent_run_id, TRIAL_TAG: trial.trial_id, "esft.kind": "trial"})
        params = {"score_function": selection["score_function"], "top_p": selection.get("top_p"),
                  "experts_per_layer": selection.get("experts_per_layer"), "lr": trial.config.get("lr"),
                  "train_shared_experts": trial.config.get("train_shared_experts"), "method": "esft",
                  "base_model": self.base_model, "data_hash": self.data_hash}
        for key, value in params.items():
            client.log_param(run.info.run_id, key, str(value))
        return run.info.run_id

    def _log_history(self, client, run_id: str, history: list[dict], until_step: int | None = None) -> None:
        for record in history:
            if until_step is not None and record["step"] > until_step:
                break
            for key, value in _numbers({k: record[k] for k in STEP_METRICS if k in record}).items():
                client.log_metric(run_id, key, value, step=int(record["step"]))

    def _log_selection(self, client, run_id: str, work: Path) -> None:
        for name in ("expert_cfg.json", "selection.png", "heatmap.png", "eval/metrics.json"):
            if (work / name).exists():
                client.log_artifact(run_id, str(work / name))

    def on_trial_complete(self, iteration, trials, trial, **info):
        if self.trial_run_id(trial.trial_id):
            return  # logged before the sweep was interrupted
        result = trial.last_result or {}
        if result.get("evaluated"):
            self._log_finished(trial, result)
        else:
            self._log_early_stopped(trial, result)

    def _log_finished(self, trial, result: dict) -> None:
        client, run_id = self._client(), self._new_run(trial)
        for key in ("selected_experts", "trainable_parameters"):
            client.log_param(run_id, key, str(result.get(key)))
        work = Path(result["work_dir"])
        self._log_history(client, run_id, json.loads((work / "train" / "metrics.json").read_text()).get("history", []))
        final = {k: v for k, v in _numbers(result).items()
                 if k not in ("selected_experts", "trainable_parameters", "step", *STEP_METRICS)
                 and not k.startswith(("time_", "training_iteration", "timestamp", "pid", "iterations_"))}
        for key, value in final.items():
            client.log_metric(run_id, key, value)
        if result.get("duplicate_of"):
            client.set_tag(run_id, "esft.duplicate_of", result["duplicate_of"])
        self._log_selection(client, run_id, work)
        if not result.get("duplicate_of"):
            client.log_artifacts(run_id, str(work / "train" / "adapter"), artifact_path="adapter")
        client.set_terminated(run_id, status="FINISHED")

    def _log_early_stopped(self, trial, result: dict) -> None:
        """A trial the scheduler stopped: its history up to the step Tune last saw (training may have gone a
        little further before its workers were shut down), its selection, no adapter, no final metrics."""
        from pipeline.tune import trained_history

        client, run_id = self._client(), self._new_run(trial)
        client.set_tag(run_id, EARLY_STOPPED_TAG, "true")
        client.log_param(run_id, "selected_experts", str(result.get("selected_experts")))
        if result.get("step") is not None:
            client.log_metric(run_id, "stopped_at_step", float(result["step"]))
        if result.get("work_dir"):
            work = Path(result["work_dir"])
            self._log_history(client, run_id, trained_history(work), until_step=result.get("step"))
            self._log_selection(client, run_id, work)
        client.set_terminated(run_id, status="FINISHED")

    def on_trial_error(self, iteration, trials, trial, **info):
        if self.trial_run_id(trial.trial_id):
            return
        client, run_id = self._client(), self._new_run(trial)
        error = trial.get_error()
        message = str(error).strip().splitlines()[-1] if error else "unknown error"
        client.set_tag(run_id, "esft.error", message[:4000])
        client.set_terminated(run_id, status="FAILED")

"""MLflow tracking and the Model Registry for ESFT adapters (used by `esft run` and by sweeps).

A registered version is the adapter directory (expert_cfg.json + model.safetensors) logged as a
run artifact, tagged with its base model and selection; the alias `champion` moves to a new
version only when its metric beats the current champion's. Load one back with

    model = pipeline.register.load_registered("models:/esft-intent@champion")

MLflow 3.17 refuses file-store tracking URIs, so the default is a SQLite database in the run
directory with an explicit artifact location beside it.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path

CHAMPION = "champion"


@dataclass(frozen=True)
class Registration:
    name: str
    version: str
    run_id: str
    champion: bool  # whether the alias moved to this version
    tracking_uri: str


def default_tracking_uri(run_dir: str | Path) -> str:
    return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{Path(run_dir).resolve() / 'mlflow.db'}"


def _experiment(client, name: str, artifact_root: Path) -> str:
    existing = client.get_experiment_by_name(name)
    if existing is not None:
        return existing.experiment_id
    return client.create_experiment(name, artifact_location=artifact_root.resolve().as_uri())


def register_adapter(
    adapter_dir: str | Path,
    *,
    model_name: str,
    run_dir: str | Path,
    metric_name: str,
    metrics: dict[str, float],
    params: dict[str, object],
    tags: dict[str, str],
    tracking_uri: str | None = None,
    experiment: str = "esft",
    higher_is_better: bool = True,
) -> Registration:
    """Log the adapter and its numbers as an MLflow run, register it as a new version of
    `model_name`, and move the champion alias to it if it beats the current champion."""
    import mlflow
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    if metric_name not in metrics or not math.isfinite(float(metrics[metric_name])):
        raise ValueError(f"register: the metric {metric_name!r} to rank versions by is missing or not finite")
    uri = tracking_uri or default_tracking_uri(run_dir)
    mlflow.set_tracking_uri(uri)
    client = MlflowClient(tracking_uri=uri)
    experiment_id = _experiment(client, experiment, Path(run_dir) / "mlartifacts")
    with mlflow.start_run(experiment_id=experiment_id, run_name=f"{model_name}-{tags.get('score_function', '')}") as run:
        mlflow.log_params({k: str(v) for k, v in params.items()})
        mlflow.log_metrics({k: float(v) for k, v in metrics.items() if isinstance(v, (int, float)) and math.isfinite(v)})
        mlflow.set_tags(tags)
        mlflow.log_artifacts(str(adapter_dir), artifact_path="adapter")
        source = f"{run.info.artifact_uri}/adapter"
    try:
        client.create_registered_model(model_name)
    except MlflowException:
        pass  # it exists already
    value = float(metrics[metric_name])
    version = client.create_model_version(
        model_name, source, run_id=run.info.run_id,
        tags={**tags, "metric_name": metric_name, "metric": repr(value)},
    )
    champion = _beats_champion(client, model_name, metric_name, value, higher_is_better)
    if champion:
        client.set_registered_model_alias(model_name, CHAMPION, version.version)
    return Registration(model_name, str(version.version), run.info.run_id, champion, uri)


def _beats_champion(client, model_name: str, metric_name: str, value: float, higher_is_better: bool) -> bool:
    from mlflow.exceptions import MlflowException

    try:
        current = client.get_model_version_by_alias(model_name, CHAMPION)
    except MlflowException:
        return True  # no champion yet
    if current.tags.get("metric_name") != metric_name:
        return True  # ranked by another metric: the newest takes over
    best = float(current.tags["metric"])
    return value > best if higher_is_better else value < best


def load_registered(model_uri: str, tracking_uri: str | None = None, base_model: str | None = None):
    """Base model + adapter from a registry URI such as `models:/NAME@champion`."""
    import mlflow
    from mlflow import MlflowClient

    from esft.adapter import adapter_summary, load_adapter
    from esft.model import load_model

    if tracking_uri:
        mlflow.set_tracking_uri(tracking_uri)
    local = mlflow.artifacts.download_artifacts(artifact_uri=model_uri)
    name, _, alias = model_uri.removeprefix("models:/").partition("@")
    tags = MlflowClient().get_model_version_by_alias(name, alias).tags if alias else {}
    base = base_model or tags.get("base_model") or adapter_summary(local)["base_model"]
    model = load_model(base)
    load_adapter(model, local, master_dtype=None)
    return model.eval()

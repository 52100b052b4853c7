"""MLflow tracking and the Model Registry for ESFT adapters (used by `esft run` and by sweeps).

A registered version is the adapter directory (expert_cfg.json + model.safetensors) logged as a
run artifact, tagged with its base model and selection; the alias `champion` moves to a new
version only when its metric beats the current champion's. Load one back and generate with

    esft generate models:/esft-sweep@champion --prompt "What is 3 plus 4?" --tracking-uri sqlite:///$PWD/runs/sweep/mlflow.db

or in Python `model, base = pipeline.register.load_registered("models:/esft-sweep@champion")`.

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


def get_or_create_experiment(client, name: str, artifact_root: Path) -> str:
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
    from mlflow import MlflowClient

    if metric_name not in metrics or not math.isfinite(float(metrics[metric_name])):
        raise ValueError(f"register: the metric {metric_name!r} to rank versions by is missing or not finite")
    uri = tracking_uri or default_tracking_uri(run_dir)
    # An explicit client, never mlflow.set_tracking_uri: that would also redirect (through the
    # MLFLOW_TRACKING_URI variable it sets) every later MLflow call of this process and its children.
    client = MlflowClient(tracking_uri=uri)
    experiment_id = get_or_create_experiment(client, experiment, Path(run_dir) / "mlartifacts")
    run = client.create_run(experiment_id, run_name=f"{model_name}-{tags.get('score_function', '')}", tags=tags)
    for key, value in params.items():
        client.log_param(run.info.run_id, key, str(value))
    for key, value in metrics.items():
        if isinstance(value, (int, float)) and math.isfinite(value):
            client.log_metric(run.info.run_id, key, float(value))
    client.log_artifacts(run.info.run_id, str(adapter_dir), artifact_path="adapter")
    client.set_terminated(run.info.run_id)
    source = f"{run.info.artifact_uri}/adapter"
    return register_version(client, model_name, source, run.info.run_id, metric_name, float(metrics[metric_name]), tags,
                            uri, higher_is_better)


def register_version(client, model_name: str, source: str, run_id: str, metric_name: str, value: float,
                     tags: dict[str, str], tracking_uri: str, higher_is_better: bool = True) -> Registration:
    """A new version of `model_name` from an adapter already logged at `source` by run `run_id`;
    the champion alias moves to it only if it beats the current champion on `metric_name`."""
    from mlflow.exceptions import MlflowException

    try:
        client.create_registered_model(model_name)
    except MlflowException:
        pass  # it exists already
    version = client.create_model_version(
        model_name, source, run_id=run_id,
        tags={**tags, "metric_name": metric_name, "metric": repr(value)},
    )
    champion = _beats_champion(client, model_name, metric_name, value, higher_is_better)
    if champion:
        client.set_registered_model_alias(model_name, CHAMPION, version.version)
    return Registration(model_name, str(version.version), run_id, champion, tracking_uri)


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


def _version_of(client, model_uri: str):
    """The registry entry behind `models:/NAME@ALIAS` or `models:/NAME/VERSION`."""
    name, _, alias = model_uri.removeprefix("models:/").partition("@")
    if alias:
        return client.get_model_version_by_alias(name, alias)
    name, _, version = name.partition("/")
    return client.get_model_version(name, version)


def load_registered(model_uri: str, tracking_uri: str | None = None, base_model: str | None = None):
    """(model, base model id): the base model with the registered adapter loaded into it, from a
    registry URI such as `models:/NAME@champion`."""
    import mlflow
    from mlflow import MlflowClient

    from esft.adapter import adapter_summary, load_adapter
    from esft.model import load_model

    # No mlflow.set_tracking_uri: it would also redirect every later MLflow call of this process.
    client = MlflowClient(tracking_uri=tracking_uri, registry_uri=tracking_uri)
    version = _version_of(client, model_uri)
    source = client.get_model_version_download_uri(version.name, version.version)
    local = mlflow.artifacts.download_artifacts(artifact_uri=source, tracking_uri=tracking_uri)
    tags = version.tags
    base = base_model or tags.get("base_model") or adapter_summary(local)["base_model"]
    model = load_model(base)
    load_adapter(model, local, master_dtype=None)
    return model.eval(), base


def generate_text(model: str, prompt: str, tracking_uri: str | None = None, max_new_tokens: int = 64,
                  trust_remote_code: bool = False) -> str:
    """Greedy answer to one user message from a registered adapter (`models:/NAME@champion`) on its
    base model, or from a plain model directory / hub id."""
    from esft.data import PROMPT_ASSISTANT, PROMPT_USER
    from esft.model import load_model
    from pipeline.data import cached_tokenizer
    from pipeline.evaluate import generate_batch

    if model.startswith("models:/"):
        loaded, base = load_registered(model, tracking_uri=tracking_uri)
    else:
        loaded, base = load_model(model, trust_remote_code=trust_remote_code).eval(), model
    tokenizer = cached_tokenizer(base, trust_remote_code)
    return generate_batch(loaded, tokenizer, [PROMPT_USER.format(input=prompt.strip()) + PROMPT_ASSISTANT], max_new_tokens,
                          ["\n\n", "User:"])[0].strip()

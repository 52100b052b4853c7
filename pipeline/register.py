"""The Model Registry for ESFT fine-tunes (used by `esft run` and by sweeps), in MLflow's own format.

A registered version is an MLflow Model (an MLflow 3 LoggedModel of the run that evaluated it,
registered from its `models:/<model_id>` URI): the adapter as an artifact, the base model logged
with it when small (else a hub id or a content fingerprint, see `pipeline.serving`), the project's
code, a signature with an input example and explicit pip requirements. So MLflow itself loads and
serves it:

    MLFLOW_TRACKING_URI=sqlite:///$PWD/runs/sweep/mlflow.db mlflow models serve -m models:/esft-sweep@champion --env-manager local
    esft generate models:/esft-sweep@champion --prompt "What is 3 plus 4?" --tracking-uri sqlite:///$PWD/runs/sweep/mlflow.db

or in Python `model, base = pipeline.register.load_registered("models:/esft-sweep@champion", tracking_uri=...)`.
The alias `champion` moves to a new version only when its metric beats the current champion's.

Every MLflow call here names its tracking URI (an explicit client; never mlflow.set_tracking_uri,
whose MLFLOW_TRACKING_URI leaks into later calls and child processes), and nothing falls back to
MLflow's default store in the current directory. MLflow 3.17 refuses file-store tracking URIs, so
the default is a SQLite database in the run directory with an explicit artifact location beside it.
"""

from __future__ import annotations

import hashlib
import logging
import math
import os
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, fields
from pathlib import Path

from esft.errors import EsftError
from pipeline.config import ConfigError
from pipeline.serving import (
    ADAPTER_ARTIFACT,
    AUTO_LOG_LIMIT_MB,
    BASE_ARTIFACT,
    DEFAULT_BATCH_SIZE,
    DEFAULT_MAX_NEW_TOKENS,
    SERVING_FORMAT,
    TOKENIZER_ARTIFACT,
    LoadedESFT,
    ServingConfig,
    answer_prompts,
    load_esft_model,
    load_from_artifacts,
    plan_base,
    stage_model_files,
)

CHAMPION = "champion"
MODEL_NAME = "esft"  # the LoggedModel's name inside its run
MERGED_MODEL_NAME = "esft-merged"
SERVING_ENTRY = Path(__file__).with_name("serving_entry.py")
# Imported by the serving code (pipeline.serving and what it imports); pinned to what logged it.
SERVING_REQUIREMENTS = ("mlflow", "torch", "transformers", "safetensors", "tokenizers", "numpy", "pandas", "pyyaml")


log = logging.getLogger("esft")

@dataclass(frozen=True)
class Registration:
    name: str
    version: str
    run_id: str
    champion: bool  # whether the alias moved to this version
    tracking_uri: str
    model_uri: str = ""  # models:/<model_id> of the logged MLflow model


@dataclass(frozen=True)
class ModelLogging:
    """How a version's model is logged (the `register` settings of a pipeline or sweep config)."""

    log_base_model: str = "auto"  # auto (when small) | always | never (then referenced by fingerprint)
    log_base_model_max_mb: float = AUTO_LOG_LIMIT_MB
    log_merged: bool = False  # also log the merged model with the transformers flavor (vLLM, TGI)

    @classmethod
    def from_settings(cls, settings: dict) -> ModelLogging:
        return cls(**{f.name: settings[f.name] for f in fields(cls) if f.name in settings})


def check_register_settings(settings: dict, known: set[str], where: str) -> None:
    """Unknown keys and bad values of a `register:` section fail before any work."""
    allowed = known | {f.name for f in fields(ModelLogging)}
    unknown = set(settings) - allowed
    if unknown:
        raise ConfigError(f"{where}: unknown register setting(s) {', '.join(sorted(unknown))}; "
                          f"known: {', '.join(sorted(allowed))}")
    options = ModelLogging.from_settings(settings)
    if options.log_base_model not in ("auto", "always", "never"):
        raise ConfigError(f"{where}: register.log_base_model must be auto, always or never")
    if not isinstance(options.log_merged, bool):
        raise ConfigError(f"{where}: register.log_merged must be true or false")


# --- tracking URIs ---------------------------------------------------------------------------------

def default_tracking_uri(run_dir: str | Path) -> str:
    return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{Path(run_dir).resolve() / 'mlflow.db'}"


def _sqlite_path(tracking_uri: str) -> Path | None:
    if not tracking_uri.startswith("sqlite:///"):
        return None
    return Path(tracking_uri.removeprefix("sqlite:///").split("?")[0])


def registry_tracking_uri(tracking_uri: str | None) -> str:
    """The tracking URI to read a registry from: the given one or $MLFLOW_TRACKING_URI, never
    MLflow's default (a new mlflow.db in the current directory), and never a new empty database."""
    uri = tracking_uri or os.environ.get("MLFLOW_TRACKING_URI")
    if not uri:
        raise ConfigError("no MLflow tracking URI for the registry; "
                          "pass --tracking-uri (e.g. sqlite:///$PWD/runs/sweep/mlflow.db) "
                          "or set MLFLOW_TRACKING_URI")
    database = _sqlite_path(uri)
    if database is not None and not database.exists():
        raise ConfigError(f"no MLflow database at {database.resolve()} (tracking URI {uri}); give the run's sqlite:///.../mlflow.db")
    return uri


def artifact_root(tracking_uri: str, run_dir: str | Path) -> Path | None:
    """Where new experiments keep artifacts: beside a SQLite database (so a registry outlives the
    run directories that fed it), MLflow's choice for a tracking server, else the run directory."""
    database = _sqlite_path(tracking_uri)
    if database is not None:
        return database.resolve().parent / "mlartifacts"
    if tracking_uri.startswith(("http://", "https://", "databricks")):
        return None
    return Path(run_dir).resolve() / "mlartifacts"


def get_or_create_experiment(client, name: str, artifact_location: Path | None) -> str:
    existing = client.get_experiment_by_name(name)
    if existing is not None:
        return existing.experiment_id
    return client.create_experiment(name, artifact_location=artifact_location.resolve().as_uri() if artifact_location else None)


def mlflow_client(tracking_uri: str):
    from mlflow import MlflowClient

    return MlflowClient(tracking_uri=tracking_uri, registry_uri=tracking_uri)


# --- logging the MLflow model ----------------------------------------------------------------------

def log_flavor_model(client, run_id: str, name: str, save: Callable[[str, object], None]) -> str:
    """MLflow 3's `log_model(name=...)` through an explicit client (the fluent call reads the global
    tracking URI): a LoggedModel of run `run_id` whose files `save(path, mlflow_model)` writes with a
    flavor's save_model. Returns the model id; `models:/<id>` is its URI."""
    from mlflow.entities import LoggedModelOutput, LoggedModelStatus
    from mlflow.models import Model

    experiment_id = client.get_run(run_id).info.experiment_id
    logged = client.create_logged_model(experiment_id, name=name, source_run_id=run_id)
    try:
        with tempfile.TemporaryDirectory(prefix="esft-model-") as tmp:
            path = str(Path(tmp) / "model")
            save(path, Model(artifact_path=logged.artifact_location, model_uuid=logged.model_id, run_id=run_id,
                             model_id=logged.model_id))
            client.log_model_artifacts(logged.model_id, path)
        client.log_outputs(run_id, [LoggedModelOutput(logged.model_id, step=0)])
        client.finalize_logged_model(logged.model_id, LoggedModelStatus.READY)
    except BaseException:
        client.finalize_logged_model(logged.model_id, LoggedModelStatus.FAILED)
        raise
    return logged.model_id


def serving_requirements() -> list[str]:
    """Explicit pins of what the serving code imports (a local build tag such as +cpu dropped)."""
    from importlib.metadata import version

    return [f"{name}=={version(name).split('+')[0]}" for name in SERVING_REQUIREMENTS]


def _stage_code(out: Path) -> list[str]:
    """Copies of the `esft` and `pipeline` packages' Python files (no assets): the version carries
    the code that loads it, so a machine without this checkout can serve it."""
    import esft
    import pipeline

    paths = []
    for package in (esft, pipeline):
        source = Path(package.__file__).parent
        for file in source.rglob("*.py"):
            if "__pycache__" not in file.parts:
                target = out / source.name / file.relative_to(source)
                target.parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(file, target)
        paths.append(str(out / source.name))
    return paths


def _signature():
    from mlflow.models import ModelSignature
    from mlflow.types import ColSpec, ParamSchema, ParamSpec, Schema

    # One unnamed string column: MLflow then accepts a DataFrame with a `prompt` column and also a
    # plain list of strings (a named column makes its schema check reject lists before predict).
    return ModelSignature(inputs=Schema([ColSpec("string")]), outputs=Schema([ColSpec("string")]),
                          params=ParamSchema([ParamSpec("max_new_tokens", "long", DEFAULT_MAX_NEW_TOKENS),
                                              ParamSpec("batch_size", "long", DEFAULT_BATCH_SIZE)]))


def log_esft_model(client, run_id: str, adapter_dir: str | Path, base_model: str, tokenizer: str | None = None,
                   options: ModelLogging = ModelLogging(), trust_remote_code: bool = False) -> tuple[str, ServingConfig]:
    """Log the adapter on `base_model` as a pyfunc MLflow Model of run `run_id`: (its model id, its config)."""
    import mlflow.pyfunc
    import pandas as pd

    fields_, base_dir = plan_base(base_model, options.log_base_model, options.log_base_model_max_mb)
    config = ServingConfig(**fields_, trust_remote_code=trust_remote_code)
    with tempfile.TemporaryDirectory(prefix="esft-stage-") as tmp:
        staged = Path(tmp)
        artifacts = {ADAPTER_ARTIFACT: str(stage_model_files(Path(adapter_dir), staged / "adapter"))}
        if base_dir is not None:
            artifacts[BASE_ARTIFACT] = str(stage_model_files(base_dir, staged / "base"))
        if tokenizer and tokenizer != base_model:
            if Path(tokenizer).is_dir():
                artifacts[TOKENIZER_ARTIFACT] = str(stage_model_files(Path(tokenizer), staged / "tokenizer", weights=False))
                config.tokenizer_logged = True
            else:
                config.tokenizer = tokenizer
        code = _stage_code(staged / "code")

        def save(path: str, mlflow_model) -> None:
            mlflow.pyfunc.save_model(path, mlflow_model=mlflow_model, python_model=str(SERVING_ENTRY), artifacts=artifacts,
                                     code_paths=code, model_config=config.as_dict(), signature=_signature(),
                                     input_example=pd.DataFrame({"prompt": ["What is 3 plus 4?"]}),
                                     pip_requirements=serving_requirements())

        return log_flavor_model(client, run_id, MODEL_NAME, save), config


def log_merged_model(client, run_id: str, adapter_dir: str | Path, base_model: str, tokenizer: str | None = None,
                     trust_remote_code: bool = False) -> str:
    """Also log the adapter merged into its base model with the transformers flavor: a plain
    checkpoint for engines that want one (vLLM, TGI). Returns its model id."""
    import mlflow.transformers

    from esft.trainable import merge_adapter

    loaded = load_esft_model(adapter_dir, base_model, tokenizer=tokenizer, trust_remote_code=trust_remote_code)
    merged = merge_adapter(loaded.model)
    requirements = serving_requirements()

    def save(path: str, mlflow_model) -> None:
        mlflow.transformers.save_model({"model": merged, "tokenizer": loaded.tokenizer}, path, mlflow_model=mlflow_model,
                                       task="text-generation", signature=_signature(), pip_requirements=requirements)

    return log_flavor_model(client, run_id, MERGED_MODEL_NAME, save)


# --- registering -----------------------------------------------------------------------------------

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
    base_model: str | None = None,
    tokenizer: str | None = None,
    options: ModelLogging = ModelLogging(),
    trust_remote_code: bool = False,
) -> Registration:
    """Log the adapter and its numbers as an MLflow run with an MLflow Model, register the model as
    a new version of `model_name`, and move the champion alias to it if it beats the current champion.
    Idempotent: an adapter already registered under `model_name` (same bytes, same metric value)
    is not registered again, so a rerun after a crash between registration and the stage marker
    adds no version; the same adapter evaluated anew (another metric value) is a new version."""
    if metric_name not in metrics or not math.isfinite(float(metrics[metric_name])):
        raise EsftError(f"register: the metric {metric_name!r} to rank versions by is missing or not finite")
    from esft.adapter import adapter_summary

    base = base_model or tags.get("base_model") or adapter_summary(adapter_dir)["base_model"]
    uri = tracking_uri or default_tracking_uri(run_dir)
    client = mlflow_client(uri)
    digest = adapter_digest(adapter_dir)
    existing = registered_version_of(client, model_name, digest, metric_name, float(metrics[metric_name]), uri)
    if existing is not None:
        log.info("register: this adapter is already version %s of %s; not registered again", existing.version, model_name)
        return existing
    tags = {**tags, ADAPTER_DIGEST_TAG: digest}
    experiment_id = get_or_create_experiment(client, experiment, artifact_root(uri, run_dir))
    run = client.create_run(experiment_id, run_name=f"{model_name}-{tags.get('score_function', '')}", tags=tags)
    try:
        for key, value in params.items():
            client.log_param(run.info.run_id, key, str(value))
        for key, value in metrics.items():
            if isinstance(value, (int, float)) and math.isfinite(value):
                client.log_metric(run.info.run_id, key, float(value))
            model_id, extra_tags = log_models(client, run.info.run_id, adapter_dir, base, tokenizer, options, trust_remote_code)
    except BaseException:
        client.set_terminated(run.info.run_id, status="FAILED")
        raise
    client.set_terminated(run.info.run_id)
    return register_version(client, model_name, model_id, run.info.run_id, metric_name, float(metrics[metric_name]),
                            {**tags, **extra_tags}, uri, higher_is_better)


ADAPTER_DIGEST_TAG = "esft.adapter_sha256"


def adapter_digest(adapter_dir: str | Path) -> str:
    """SHA-256 over an adapter directory's file names and bytes: what makes two adapters the same."""
    digest = hashlib.sha256()
    root = Path(adapter_dir)
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        digest.update(str(path.relative_to(root)).encode() + b"\0")
        with path.open("rb") as handle:
            for chunk in iter(lambda: handle.read(1 << 20), b""):
                digest.update(chunk)
    return digest.hexdigest()


def registered_version_of(client, model_name: str, digest: str, metric_name: str, value: float,
                          tracking_uri: str) -> Registration | None:
    """The version of `model_name` already registered from an adapter with this digest and this
    metric value (the tags register_version writes), if any."""
    from mlflow.exceptions import MlflowException

    try:
        versions = client.search_model_versions(f"name = '{model_name}'")
    except MlflowException:
        return None  # no such registered model yet
    for version in versions:
        tags = version.tags
        if (tags.get(ADAPTER_DIGEST_TAG), tags.get("metric_name"), tags.get("metric")) == (digest, metric_name, repr(value)):
            try:
                champion = str(client.get_model_version_by_alias(model_name, CHAMPION).version) == str(version.version)
            except MlflowException:
                champion = False
            return Registration(model_name, str(version.version), version.run_id, champion, tracking_uri,
                                version.tags.get("model_uri", ""))
    return None


def log_models(client, run_id: str, adapter_dir: str | Path, base_model: str, tokenizer: str | None, options: ModelLogging,
               trust_remote_code: bool = False) -> tuple[str, dict[str, str]]:
    """(model id of the pyfunc model, version tags saying how the base travels and where a merged copy is)."""
    model_id, config = log_esft_model(client, run_id, adapter_dir, base_model, tokenizer, options, trust_remote_code)
    tags = {"base_source": config.base_source}
    if config.base_fingerprint:
        tags["base_fingerprint"] = config.base_fingerprint
    if config.base_revision:
        tags["base_revision"] = config.base_revision
    if options.log_merged:
        tags["merged_model_uri"] = (
            f"models:/{log_merged_model(client, run_id, adapter_dir, base_model, tokenizer, trust_remote_code)}"
        )
    return model_id, tags


def register_version(client, model_name: str, model_id: str, run_id: str, metric_name: str, value: float,
                     tags: dict[str, str], tracking_uri: str, higher_is_better: bool = True) -> Registration:
    """A new version of `model_name` from the MLflow model `models:/<model_id>` logged by run `run_id`;
    the champion alias moves to it only if it beats the current champion on `metric_name`."""
    from mlflow.exceptions import MlflowException

    try:
        client.create_registered_model(model_name)
    except MlflowException:
        pass  # it exists already
    # The source is the logged model's storage location, linked by model_id: given `models:/<id>`,
    # MLflow 3.17's SQL registry looks the model up through the global tracking URI (its own TODO),
    # which here is unset, so it would open ./mlflow.db in the current directory.
    location = client.get_logged_model(model_id).artifact_location
    # That registry keeps no model id on a version either, so a tag names the LoggedModel.
    version = client.create_model_version(model_name, location, run_id=run_id, model_id=model_id,
                                          tags={**tags, "metric_name": metric_name, "metric": repr(value),
                                                "model_uri": f"models:/{model_id}"})
    client.update_model_version(model_name, version.version, description=version_description(
        model_name, str(version.version), tracking_uri, tags.get("base_model", "")))
    champion = _beats_champion(client, model_name, metric_name, value, higher_is_better)
    if champion:
        client.set_registered_model_alias(model_name, CHAMPION, version.version)
    return Registration(model_name, str(version.version), run_id, champion, tracking_uri, f"models:/{model_id}")


def version_description(name: str, version: str, tracking_uri: str, base_model: str) -> str:
    """How to load and serve this version, shown in the MLflow UI."""
    uri = f"models:/{name}/{version}"
    return (f"ESFT fine-tune of {base_model} (pyfunc MLflow Model; "
            "the adapter, and the base model when small, are its artifacts).\n\n"
            f"Python: `mlflow.pyfunc.load_model(\"{uri}\").predict(pandas.DataFrame({{\"prompt\": [\"What is 3 plus 4?\"]}}), "
            f"params={{\"max_new_tokens\": 64}})` with MLFLOW_TRACKING_URI={tracking_uri}\n\n"
            f"Serve: `MLFLOW_TRACKING_URI={tracking_uri} mlflow models serve -m {uri} --env-manager local -h 127.0.0.1 -p 5000`, "
            "then `curl -s 127.0.0.1:5000/invocations -H 'Content-Type: application/json' "
            "-d '{\"dataframe_records\": [{\"prompt\": \"What is 3 plus 4?\"}]}'`\n\n"
            f"CLI: `esft generate {uri} --prompt \"What is 3 plus 4?\" --tracking-uri {tracking_uri}`")


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


# --- loading a registered version ------------------------------------------------------------------

def _version_of(client, model_uri: str, tracking_uri: str):
    """The registry entry behind `models:/NAME@ALIAS` or `models:/NAME/VERSION`."""
    from mlflow.exceptions import MlflowException

    name, _, alias = model_uri.removeprefix("models:/").partition("@")
    version = None
    if not alias:
        name, _, version = name.partition("/")
    if not model_uri.startswith("models:/") or not name or not (alias or version):
        raise EsftError(f"{model_uri!r} is not a registry URI; use models:/NAME@ALIAS or models:/NAME/VERSION")
    try:
        return client.get_model_version_by_alias(name, alias) if alias else client.get_model_version(name, version)
    except MlflowException as error:
        raise EsftError(f"{model_uri} is not in the registry at {tracking_uri}: {error.message.splitlines()[0]}") from error


def load_registered_model(model_uri: str, tracking_uri: str | None = None, base_model: str | None = None) -> LoadedESFT:
    """The model of a registry URI such as `models:/NAME@champion`, through the same loader as
    `mlflow.pyfunc.load_model` (`base_model`: a local copy of the base model to use instead)."""
    import mlflow.artifacts

    uri = registry_tracking_uri(tracking_uri)
    client = mlflow_client(uri)
    version = _version_of(client, model_uri, uri)
    source = client.get_model_version_download_uri(version.name, version.version)
    # Loaded weights live in memory (or in mappings that outlive the files), so the download can go.
    with tempfile.TemporaryDirectory(prefix="esft-registered-") as tmp:
        try:
            local = Path(mlflow.artifacts.download_artifacts(artifact_uri=source, dst_path=tmp, tracking_uri=uri))
        except Exception as error:  # a moved or deleted artifact store
            raise EsftError(f"cannot fetch the files of {model_uri} from {source}: {str(error).splitlines()[0]}") from error
        if (local / "MLmodel").exists():
            return _load_logged_model(local, model_uri, base_model)
        return _load_legacy_adapter(local, version, model_uri, base_model)


def _load_logged_model(local: Path, model_uri: str, base_model: str | None) -> LoadedESFT:
    from mlflow.models import Model
    from mlflow.pyfunc import FLAVOR_NAME, MODEL_CONFIG

    flavor = Model.load(str(local / "MLmodel")).flavors.get(FLAVOR_NAME) or {}
    config = dict(flavor.get(MODEL_CONFIG) or {})
    if config.get("format") != SERVING_FORMAT:
        raise EsftError(f"{model_uri} is an MLflow model but not an ESFT one; load it with mlflow.pyfunc.load_model")
    if base_model:
        config["base_model_path"] = base_model
    artifacts = {name: str(local / info["path"]) for name, info in (flavor.get("artifacts") or {}).items()}
    return load_from_artifacts(artifacts, config)


def _load_legacy_adapter(local: Path, version, model_uri: str, base_model: str | None) -> LoadedESFT:
    """A version registered by esft before versions were MLflow Models: a bare adapter directory
    whose `base_model` tag names the base (often a path on the machine that trained it)."""
    from esft.adapter import adapter_summary
    from esft.select import CONFIG_FILENAME

    if not (local / CONFIG_FILENAME).exists():
        raise EsftError(f"{model_uri} is neither an ESFT MLflow model nor an ESFT adapter (no MLmodel, no {CONFIG_FILENAME})")
    base = base_model or version.tags.get("base_model") or adapter_summary(local)["base_model"]
    if base.startswith(("/", "./", "../", "~")) and not Path(base).expanduser().is_dir():
        raise EsftError(f"{model_uri} is a bare adapter registered by an older esft on the base model {base}, which is not on "
                        "this machine; pass a copy with --base-model DIR (load_registered(..., base_model=DIR)), or register it "
                        "again with this esft so the base model travels with it")
    return load_esft_model(local, base)


def load_registered(model_uri: str, tracking_uri: str | None = None, base_model: str | None = None):
    """(model, base model path or id): the base model with the registered adapter applied."""
    loaded = load_registered_model(model_uri, tracking_uri, base_model)
    return loaded.model, loaded.base


def generate_text(model: str, prompt: str, tracking_uri: str | None = None, max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS,
                  trust_remote_code: bool = False, base_model: str | None = None) -> str:
    """Greedy answer to one user message from a registered version (`models:/NAME@champion`), or
    from a plain model directory / hub id: the same generation as the pyfunc model's predict."""
    if model.startswith("models:/"):
        loaded = load_registered_model(model, tracking_uri=tracking_uri, base_model=base_model)
    else:
        from transformers import AutoTokenizer

        from esft.model import load_model

        weights = load_model(model, trust_remote_code=trust_remote_code).eval()
        try:
            tokenizer = AutoTokenizer.from_pretrained(model, trust_remote_code=trust_remote_code)
        except (OSError, ValueError) as error:  # no tokenizer files; custom code without trust_remote_code
            raise EsftError(f"cannot load the tokenizer of {model!r}: {str(error).splitlines()[0]}") from error
        loaded = LoadedESFT(weights, tokenizer, model)
    return answer_prompts(loaded, [prompt], max_new_tokens=max_new_tokens)[0]

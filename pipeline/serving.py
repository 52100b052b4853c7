"""A registered ESFT fine-tune as an MLflow pyfunc model, and the one loader behind it.

    import mlflow, pandas as pd   # with MLFLOW_TRACKING_URI pointing at the registry
    model = mlflow.pyfunc.load_model("models:/esft-sweep@champion")
    model.predict(pd.DataFrame({"prompt": ["What is 3 plus 4?"]}), params={"max_new_tokens": 32})

A registered version is an MLflow Model whose artifacts hold the ESFT adapter (and, when it is
small, the base model itself). `ESFTModel.load_context` loads the base model and applies the
adapter; `predict` answers a DataFrame with a `prompt` column (or a list of strings) with
batched greedy generation, one answer string per prompt. `esft generate` and
`pipeline.register.load_registered` go through the same `load_from_artifacts`.

The base model is recorded so the version loads on another machine: a hub id stays a hub id
(with its revision when the local Hugging Face cache knows it); a local directory is logged with
the model or referenced by a content fingerprint, and a loader that cannot find the same files
says what is missing and how to point at a copy (the `base_model_path` model config key).

This module imports MLflow but never Ray: a serving process needs neither Ray nor a GPU.
"""

from __future__ import annotations

import hashlib
import os
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path

import mlflow.pyfunc
import numpy as np
import pandas as pd

from esft.errors import EsftError

# Names of the artifacts inside the logged MLflow model.
ADAPTER_ARTIFACT, BASE_ARTIFACT, TOKENIZER_ARTIFACT = "adapter", "base_model", "tokenizer"
# How the base model travels with a version.
BASE_HUB, BASE_LOGGED, BASE_LOCAL = "hub", "logged", "local"
LOG_BASE_CHOICES = ("auto", "always", "never")
AUTO_LOG_LIMIT_MB = 100.0  # `auto` logs a local base model up to this size (the embedded mini-moe is ~19 MB)
# The files `from_pretrained` reads from a Hugging Face model directory; never pickles (*.bin, *.pt).
MODEL_FILE_SUFFIXES = (".json", ".safetensors", ".model", ".txt", ".tiktoken", ".jinja", ".py")
SERVING_FORMAT = "esft-pyfunc/1"
DEFAULT_MAX_NEW_TOKENS = 64
DEFAULT_BATCH_SIZE = 8
DEFAULT_STOPS = ["\n\n", "User:"]
_FULL_HASH_BYTES = 64 * 1024**2  # files up to this size are hashed whole
_SAMPLE_BLOCKS, _BLOCK_BYTES = 16, 1024**2  # larger ones: 16 evenly spaced 1 MiB blocks and the last one


@dataclass
class ServingConfig:
    """What a version needs besides its artifacts; stored as the pyfunc model config (MLmodel)."""

    base_model: str  # as trained: hub id, tiny:<family> or the local directory it came from
    base_source: str  # hub | logged (artifact `base_model`) | local (referenced by fingerprint)
    base_revision: str | None = None
    base_fingerprint: str | None = None
    tokenizer: str | None = None  # None: the base model's; a hub id; or the logged `tokenizer` artifact
    tokenizer_logged: bool = False
    trust_remote_code: bool = False
    stop: list[str] = field(default_factory=lambda: list(DEFAULT_STOPS))
    base_model_path: str | None = None  # set at load time: a local copy of the base model to use instead
    format: str = SERVING_FORMAT

    @classmethod
    def from_dict(cls, values: dict) -> ServingConfig:
        known = {f for f in cls.__dataclass_fields__}
        return cls(**{k: v for k, v in values.items() if k in known})

    def as_dict(self) -> dict:
        return asdict(self)


@dataclass
class LoadedESFT:
    model: object  # the base model with the adapter applied, in eval mode
    tokenizer: object
    base: str  # the path or hub id the base weights were loaded from
    stop: list[str] = field(default_factory=lambda: list(DEFAULT_STOPS))  # answers end at the first of these


# --- base model: files, fingerprint, how it travels ------------------------------------------------

def model_files(directory: str | Path) -> list[Path]:
    """The files of a model directory that loading reads (top level, as Hugging Face writes them)."""
    directory = Path(directory)
    return sorted(p for p in directory.iterdir()
                  if p.is_file() and not p.name.startswith(".") and p.suffix in MODEL_FILE_SUFFIXES)


def _file_digest(path: Path) -> str:
    """sha256 of a file's content: whole when small; for large weight shards, evenly spaced blocks
    (reading tens of GB at every load would cost more than loading the model)."""
    digest, size = hashlib.sha256(), path.stat().st_size
    with path.open("rb") as handle:
        if size <= _FULL_HASH_BYTES:
            for chunk in iter(lambda: handle.read(_BLOCK_BYTES), b""):
                digest.update(chunk)
        else:
            step = (size - _BLOCK_BYTES) // _SAMPLE_BLOCKS
            for offset in [i * step for i in range(_SAMPLE_BLOCKS)] + [size - _BLOCK_BYTES]:
                handle.seek(offset)
                digest.update(handle.read(_BLOCK_BYTES))
    return digest.hexdigest()


def fingerprint(directory: str | Path) -> str:
    """Content fingerprint of a model directory: every model file's name, size and content digest.
    Independent of paths and modification times, so a copy on another machine matches."""
    digest = hashlib.sha256()
    for path in model_files(directory):
        digest.update(f"{path.name}\t{path.stat().st_size}\t{_file_digest(path)}\n".encode())
    return "sha256:" + digest.hexdigest()


def hub_revision(hub_id: str, cache_dir: str | None = None) -> str | None:
    """The commit of a hub model in the local Hugging Face cache (None when unknown)."""
    try:
        from huggingface_hub import try_to_load_from_cache

        cached = try_to_load_from_cache(hub_id, "config.json", cache_dir=cache_dir)
    except Exception:  # not a valid repo id, no cache: the revision is simply unknown
        return None
    if isinstance(cached, str) and "/snapshots/" in cached:
        return Path(cached).parent.name
    return None


def plan_base(base_model: str, log_base_model: str = "auto", limit_mb: float = AUTO_LOG_LIMIT_MB) -> tuple[dict, Path | None]:
    """(ServingConfig fields describing the base model, directory to log with the version or None)."""
    if log_base_model not in LOG_BASE_CHOICES:
        raise EsftError(f"register: log_base_model must be one of {', '.join(LOG_BASE_CHOICES)}, not {log_base_model!r}")
    local = Path(base_model).expanduser()
    if not local.is_dir():
        if base_model.startswith(("/", "./", "../", "~")):
            raise EsftError(f"register: the base model directory {base_model} does not exist")
        return {"base_model": base_model, "base_source": BASE_HUB, "base_revision": hub_revision(base_model)}, None
    local = local.resolve()
    files = model_files(local)
    if not any(p.suffix == ".safetensors" for p in files):
        raise EsftError(f"register: {local} holds no safetensors weights; save the base model with save_pretrained")
    size_mb = sum(p.stat().st_size for p in files) / 1024**2
    logged = log_base_model == "always" or (log_base_model == "auto" and size_mb <= limit_mb)
    fields = {"base_model": str(local), "base_source": BASE_LOGGED if logged else BASE_LOCAL,
              "base_fingerprint": fingerprint(local)}
    return fields, local if logged else None


def stage_model_files(directory: Path, out: Path, weights: bool = True) -> Path:
    """A copy (hard links where possible) of a model directory's model files only: no optimizer
    states, logs or pickles travel with a version."""
    out.mkdir(parents=True, exist_ok=True)
    for path in model_files(directory):
        if not weights and path.suffix == ".safetensors":
            continue
        try:
            os.link(path, out / path.name)
        except OSError:  # another file system: copy
            shutil.copy2(path, out / path.name)
    return out


# --- loading ---------------------------------------------------------------------------------------

def _how_to_point_at_a_copy() -> str:
    return ("point at a copy with `esft generate --base-model DIR`, mlflow.pyfunc.load_model(uri, model_config="
            "{'base_model_path': DIR}), or MLFLOW_PYFUNC_INFERENCE_CONFIG='{\"base_model_path\": \"DIR\"}' "
            "for mlflow models serve")


def resolve_base(config: ServingConfig, artifacts: dict[str, str]) -> tuple[str, str | None]:
    """(path or hub id to load the base weights from, revision) for this version on this machine.
    A directory that did not travel with the version must have the fingerprint it was trained on."""
    override = config.base_model_path
    if override:
        path = Path(override).expanduser()
        if not path.is_dir():
            raise EsftError(f"base_model_path {path} is not a directory; give a local copy of {config.base_model}")
    elif config.base_source == BASE_HUB:
        return config.base_model, config.base_revision
    elif config.base_source == BASE_LOGGED:
        return artifacts[BASE_ARTIFACT], None
    else:
        path = Path(config.base_model)
        if not path.is_dir():
            raise EsftError(f"the base model of this version, {config.base_model} (fingerprint {config.base_fingerprint}), "
                            "was not logged with it and is not on this machine; copy the same model there, or "
                            + _how_to_point_at_a_copy())
    if config.base_fingerprint:
        found = fingerprint(path)
        if found != config.base_fingerprint:
            raise EsftError(f"{path} is not the base model this version was trained on ({config.base_model}): its fingerprint is "
                            f"{found}, expected {config.base_fingerprint}; " + _how_to_point_at_a_copy())
    return str(path), None


def load_esft_model(adapter_dir: str | Path, base: str, revision: str | None = None, tokenizer: str | None = None,
                    trust_remote_code: bool = False) -> LoadedESFT:
    """The base model with the adapter applied, and its tokenizer."""
    from transformers import AutoTokenizer

    from esft.adapter import load_adapter
    from esft.model import load_model

    model = load_model(base, trust_remote_code=trust_remote_code, revision=revision)
    load_adapter(model, adapter_dir, master_dtype=None)
    tokenizer_source = tokenizer or base
    extra = {"revision": revision} if revision and not tokenizer else {}
    try:
        loaded_tokenizer = AutoTokenizer.from_pretrained(tokenizer_source, trust_remote_code=trust_remote_code, **extra)
    except (OSError, ValueError) as error:  # ValueError: custom code without trust_remote_code
        raise EsftError(f"cannot load the tokenizer {tokenizer_source!r}: {str(error).splitlines()[0]}") from error
    return LoadedESFT(model.eval(), loaded_tokenizer, base)


def load_from_artifacts(artifacts: dict[str, str], model_config: dict) -> LoadedESFT:
    """The loader of a registered version: its artifacts (local paths) and its model config."""
    config = ServingConfig.from_dict(model_config or {})
    if config.format != SERVING_FORMAT:
        raise EsftError(f"this model was logged in format {config.format!r}; this esft reads {SERVING_FORMAT!r}")
    base, revision = resolve_base(config, artifacts)
    tokenizer = artifacts[TOKENIZER_ARTIFACT] if config.tokenizer_logged else config.tokenizer
    loaded = load_esft_model(artifacts[ADAPTER_ARTIFACT], base, revision, tokenizer, config.trust_remote_code)
    loaded.stop = list(config.stop)
    return loaded


# --- generation ------------------------------------------------------------------------------------

def prompts_of(model_input) -> list[str]:
    """The user messages of a predict call: a DataFrame with a `prompt` column, a list of strings,
    a dict {"prompt": [...]} or one string."""
    if isinstance(model_input, pd.DataFrame):
        if "prompt" not in model_input.columns:
            if len(model_input.columns) != 1:
                raise EsftError(f"predict: give a DataFrame with a 'prompt' column; got columns {list(model_input.columns)}")
            model_input = model_input.rename(columns={model_input.columns[0]: "prompt"})
        prompts = model_input["prompt"].tolist()
    elif isinstance(model_input, dict):
        prompts = model_input.get("prompt")
        prompts = [prompts] if isinstance(prompts, str) else prompts
    elif isinstance(model_input, str):
        prompts = [model_input]
    else:
        prompts = list(model_input)
    if isinstance(prompts, list):  # a {"prompt": [...]} dict arrives as one row holding the list
        prompts = [q for p in prompts
                   for q in ([p] if isinstance(p, str) else list(p) if isinstance(p, (list, tuple, np.ndarray)) else [p])]
    if not isinstance(prompts, list) or not all(isinstance(p, str) for p in prompts):
        raise EsftError("predict: every prompt must be a string")
    return prompts


def answer_prompts(loaded: LoadedESFT, prompts: list[str], max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS,
                   batch_size: int = DEFAULT_BATCH_SIZE) -> list[str]:
    """Greedy answers to user messages (reference prompt template), generated in batches."""
    from esft.data import PROMPT_ASSISTANT, PROMPT_USER
    from esft.generation import generate_batch

    if max_new_tokens < 1 or batch_size < 1:
        raise EsftError("predict: max_new_tokens and batch_size must be positive integers")
    formatted = [PROMPT_USER.format(input=p.strip()) + PROMPT_ASSISTANT for p in prompts]
    answers: list[str] = []
    for start in range(0, len(formatted), batch_size):
        chunk = formatted[start:start + batch_size]
        answers += generate_batch(loaded.model, loaded.tokenizer, chunk, max_new_tokens, loaded.stop)
    return [a.strip() for a in answers]


class ESFTModel(mlflow.pyfunc.PythonModel):
    """The pyfunc model of a registered version (built by `pipeline/serving_entry.py`)."""

    def load_context(self, context) -> None:
        self.loaded = load_from_artifacts(context.artifacts, context.model_config)

    # A DataFrame annotation: MLflow's signature check has already turned lists into a DataFrame, and
    # the hint keeps MLflow from type-hint validation (and from warning that there is none).
    def predict(self, context, model_input: pd.DataFrame, params: dict | None = None) -> list[str]:
        params = params or {}
        return answer_prompts(self.loaded, prompts_of(model_input),
                              max_new_tokens=int(params.get("max_new_tokens", DEFAULT_MAX_NEW_TOKENS)),
                              batch_size=int(params.get("batch_size", DEFAULT_BATCH_SIZE)))

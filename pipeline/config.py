"""Typed stage configs: dataclasses whose serialised form is a YAML file.

A stage's settings come from its dataclass defaults, then the YAML file (`--config FILE`), then
the command-line flags the user actually gave. Unknown keys are errors, not silent typos.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, TypeVar

import yaml

from esft.errors import EsftError

T = TypeVar("T")


class ConfigError(EsftError):
    """A config file or value is invalid."""


def read_yaml(path: str | Path) -> dict[str, Any]:
    try:
        data = yaml.safe_load(Path(path).read_text()) or {}
    except (OSError, yaml.YAMLError) as error:
        raise ConfigError(f"cannot read config {path}: {error}") from error
    if not isinstance(data, dict):
        raise ConfigError(f"config {path} must be a mapping of setting: value")
    return data


# Scalar settings (and sections) are checked against their field's annotation as the file gives
# them, so that `lr: fast`, `steps: [1, 2]` or `select: [..]` is an error naming the setting before
# any work, not a worker's traceback.
SCALAR_KINDS = {"int": ((int,), "an integer"), "float": ((int, float), "a number"), "bool": ((bool,), "true or false"),
                "str": ((str,), "a string"), "dict": ((dict,), "a section (a mapping of setting: value)")}


def checked_value(name: str, annotation: Any, value: Any, where: str) -> Any:
    """`value` of setting `name` if it fits its scalar annotation (a float field also takes a
    number written as text: PyYAML reads `1e-5` as a string); other annotations pass through."""
    annotation = annotation if isinstance(annotation, str) else getattr(annotation, "__name__", str(annotation))
    base = annotation.removesuffix(" | None")
    if base not in SCALAR_KINDS or (value is None and base != annotation):
        return value
    if base == "dict" and value is None:  # `profile:` with nothing under it: an empty section
        return {}
    types, kind = SCALAR_KINDS[base]
    if base == "float" and isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            pass
    if isinstance(value, types) and (base == "bool" or not isinstance(value, bool)):
        return float(value) if base == "float" else value
    raise ConfigError(f"{where}: {name} must be {kind}, got {value!r}")


def build_config(cls: type[T], file_values: dict[str, Any], overrides: dict[str, Any], where: str = "config") -> T:
    """`cls` from file values, then overrides (None means 'not given'); unknown keys and scalar
    values of the wrong type are errors."""
    annotations = {f.name: f.type for f in dataclasses.fields(cls)}
    unknown = sorted(set(file_values) - set(annotations))
    if unknown:
        raise ConfigError(f"{where}: unknown setting(s) {', '.join(unknown)}; known: {', '.join(sorted(annotations))}")
    values = {**file_values, **{k: v for k, v in overrides.items() if v is not None and k in annotations}}
    values = {k: checked_value(k, annotations[k], v, where) for k, v in values.items()}
    try:
        return cls(**values)
    except TypeError as error:
        raise ConfigError(f"{where}: {error}") from error


def absolute_local_paths(config: Any, *names: str) -> None:
    """Rewrite the settings `names` of `config` that name an existing local file or directory as
    absolute paths, in place. Ray workers do not run in the driver's directory (Ray Train moves
    each worker into its run's storage directory; a job on a cluster runs in its own working
    directory), so a relative `--model ./my-model` that the driver found would not be found there.
    Hub ids, `tiny:` models and registry URIs pass through unchanged."""
    for name in names:
        value = getattr(config, name)
        if isinstance(value, str) and value and Path(value).expanduser().exists():
            setattr(config, name, str(Path(value).expanduser().resolve()))

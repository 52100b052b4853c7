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


def build_config(cls: type[T], file_values: dict[str, Any], overrides: dict[str, Any], where: str = "config") -> T:
    """`cls` from file values, then overrides (None means 'not given'); unknown keys are errors."""
    fields = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(file_values) - fields)
    if unknown:
        raise ConfigError(f"{where}: unknown setting(s) {', '.join(unknown)}; known: {', '.join(sorted(fields))}")
    values = {**file_values, **{k: v for k, v in overrides.items() if v is not None and k in fields}}
    try:
        return cls(**values)
    except TypeError as error:
        raise ConfigError(f"{where}: {error}") from error

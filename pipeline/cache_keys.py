"""Cache keys for stage results: what `esft run` skips and what `esft tune` reuses.

A result may be reused only when everything it was computed from is the same, so a key hashes the
stage's settings with its input *files by content* (regenerating `train.jsonl` in place must
invalidate the profile, whatever its path) and its model directories by a cheap fingerprint (the
weights of a real model are tens of GB: their names, sizes and modification times stand in for
their bytes). Hub ids and other names that are not local paths hash as themselves.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable
from pathlib import Path


def digest(value: object) -> str:
    """A short, stable hash of a JSON-able value (dict keys in any order)."""
    return hashlib.sha256(json.dumps(value, sort_keys=True, default=str).encode()).hexdigest()[:16]


def content_hash(spec: str | None) -> str | None:
    """Hash of a local data file's or directory's bytes (a hub dataset hashes as its name)."""
    if spec is None:
        return None
    path = Path(spec)
    hasher = hashlib.sha256()
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path] if path.is_file() else []
    if not files:
        hasher.update(spec.encode())
    for file in files:
        hasher.update(str(file.relative_to(path) if path.is_dir() else file.name).encode())
        with file.open("rb") as handle:
            for chunk in iter(lambda: handle.read(1 << 20), b""):
                hasher.update(chunk)
    return hasher.hexdigest()[:16]


def model_fingerprint(spec: str | None) -> str | None:
    """A model directory's identity without reading its weights: the config's bytes and each
    file's name, size and modification time. A hub id (or None) is itself."""
    if spec is None or not Path(spec).is_dir():
        return spec
    path = Path(spec)
    hasher = hashlib.sha256((path / "config.json").read_bytes() if (path / "config.json").exists() else b"")
    for file in sorted(p for p in path.rglob("*") if p.is_file()):
        stat = file.stat()
        hasher.update(f"{file.relative_to(path)}:{stat.st_size}:{stat.st_mtime_ns}".encode())
    return hasher.hexdigest()[:16]


def keyed(settings: dict, data: Iterable[str] = (), models: Iterable[str] = ()) -> dict:
    """`settings` with the named data settings (a path or a list of paths) replaced by their
    content hashes and the named model settings by their fingerprints: the stage's cache key
    material, to pass to `digest` or to store."""
    key = dict(settings)
    for name in data:
        value = key.get(name)
        key[name] = [content_hash(v) for v in value] if isinstance(value, (list, tuple)) else content_hash(value)
    for name in models:
        key[name] = model_fingerprint(key.get(name))
    return key

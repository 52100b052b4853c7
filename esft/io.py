"""Atomic file and directory writes: an interrupted run never leaves a half-written artifact.

The temporary files and directories behind them are created private (0600 / 0700) by
`tempfile`; before they are renamed into place they get the permissions any other file would:
0666 / 0777 less the user's umask, so outputs on shared cluster storage stay shareable.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from esft.errors import EsftError


class OutputError(EsftError):
    """An output path that cannot be written: it exists (without overwrite), has the wrong kind, or
    lies in a read-only or unwritable directory."""


def check_output(path: str | Path, *, directory: bool, overwrite: bool, flag: str = "--out") -> None:
    """Check an output target before any work is spent on it (every `esft` command's --out policy).

    An existing target is refused unless `overwrite` (a directory only when it is not empty, as
    `atomic_directory` replaces an empty one anyway); a file where a directory goes, or the
    reverse, is refused even then. Outputs are written to a temporary sibling and renamed, so
    the nearest existing parent must be a directory this process can write in (os.access also
    reports a read-only file system, for root too)."""
    path = Path(path)
    if path.exists():
        if directory and not path.is_dir():
            raise OutputError(f"{flag} {path} is a file, but a directory is written there; choose another {flag}")
        if not directory and path.is_dir():
            raise OutputError(f"{flag} {path} is a directory, but a file is written there; give a file path "
                              f"such as {path / 'out.json'}")
        if not overwrite and (not directory or any(path.iterdir())):
            raise OutputError(f"{flag} {path} already exists; pass --overwrite to replace it, or choose another {flag}")
    parent = path.absolute().parent
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir():
        raise OutputError(f"{flag} {path} cannot be created: {parent} is a file, not a directory")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise OutputError(f"{flag} {path} cannot be written: {parent} is read-only or not writable by this user; "
                          f"choose a writable {flag}")


def current_umask() -> int:
    """The process umask, read without changing it where Linux tells it (os.umask can only set it)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except OSError:
        pass
    mask = os.umask(0o022)  # elsewhere: set and restore at once
    os.umask(mask)
    return mask


def atomic_write_text(path: str | Path, text: str) -> None:
    """Write `text` to a temporary file beside `path`, then rename it into place."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.fchmod(fd, 0o666 & ~current_umask())
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.write(text)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


@contextmanager
def atomic_directory(path: str | Path, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary directory beside `path`; on success it replaces `path` in one rename.

    On any error (or Ctrl-C) the temporary directory is removed and `path` is left untouched."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise FileExistsError(f"{path} is a file, but a directory is written there; choose another --out")
    if path.exists() and not overwrite and any(path.iterdir()):
        raise FileExistsError(f"{path} already exists and is not empty; choose another --out or remove it")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp"))
    try:
        tmp.chmod(0o777 & ~current_umask())
        yield tmp
        if path.exists():
            shutil.rmtree(path)
        os.replace(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise

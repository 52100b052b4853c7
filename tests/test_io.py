"""Atomic writes: whole or nothing, and permissions from the user's umask (shared storage)."""

from __future__ import annotations

import os
import stat

import pytest

from esft.io import atomic_directory, atomic_write_text, current_umask


@pytest.fixture
def umask():
    """Run a test under a given umask, restoring the previous one."""
    previous = os.umask(0o022)
    os.umask(previous)

    def set_mask(mask: int) -> None:
        os.umask(mask)

    yield set_mask
    os.umask(previous)


def mode(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


@pytest.mark.parametrize("mask", [0o022, 0o002, 0o077])
def test_outputs_follow_the_umask(tmp_path, umask, mask):
    umask(mask)
    assert current_umask() == mask
    atomic_write_text(tmp_path / "file.json", "{}")
    with atomic_directory(tmp_path / "out") as out:
        (out / "weights.bin").write_bytes(b"x")
        atomic_write_text(out / "config.json", "{}")
    assert mode(tmp_path / "file.json") == 0o666 & ~mask
    assert mode(tmp_path / "out") == 0o777 & ~mask
    assert mode(tmp_path / "out" / "config.json") == 0o666 & ~mask
    assert mode(tmp_path / "out" / "weights.bin") == 0o666 & ~mask


def test_a_failed_directory_write_leaves_nothing(tmp_path):
    with pytest.raises(RuntimeError, match="boom"):
        with atomic_directory(tmp_path / "out") as out:
            (out / "half.bin").write_bytes(b"x")
            raise RuntimeError("boom")
    assert list(tmp_path.iterdir()) == []

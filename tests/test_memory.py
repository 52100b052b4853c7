"""esft.memory.keep_freed_memory: a block of a forward's size comes from the heap instead of its own mmap,
and stays in the process once freed; ESFT_KEEP_FREED_MEMORY=0 leaves glibc's defaults (mmap'd, returned at
once). Read from glibc's own accounting (mallinfo2) in a fresh process each: the setting is process-wide.
What this buys on a real forward loop (page faults, time) is measured by bench/forward_thread.py."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

BLOCK = 24 << 20  # under the kept mmap threshold (32 MiB), far above glibc's starting one (128 KiB)

ALLOCATE_AND_FREE = f"""
import ctypes
from esft.memory import keep_freed_memory
applied = keep_freed_memory()
class MallInfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in
                "arena ordblks smblks hblks hblkhd usmblks fsmblks uordblks fordblks keepcost".split()]
libc = ctypes.CDLL(None)
libc.mallinfo2.restype = MallInfo2
libc.malloc.restype, libc.malloc.argtypes, libc.free.argtypes = ctypes.c_void_p, [ctypes.c_size_t], [ctypes.c_void_p]
before = libc.mallinfo2()
block = libc.malloc({BLOCK})
ctypes.memset(block, 1, {BLOCK})
during = libc.mallinfo2()
libc.free(block)
after = libc.mallinfo2()
print(applied, during.hblkhd - before.hblkhd, after.fordblks - before.fordblks)
"""


def glibc_with_mallinfo2() -> bool:
    try:
        version = os.confstr("CS_GNU_LIBC_VERSION") or ""
    except (ValueError, OSError, AttributeError):
        return False
    major, _, minor = version.removeprefix("glibc ").partition(".")
    return version.startswith("glibc ") and (int(major), int(minor or 0)) >= (2, 33)


def allocate_and_free(keep: bool) -> tuple[bool, int, int]:
    """(applied, bytes mmap'd for the block, free bytes the heap kept after it was freed)."""
    env = {**os.environ, "ESFT_KEEP_FREED_MEMORY": "1" if keep else "0"}
    applied, mapped, kept = subprocess.run([sys.executable, "-c", ALLOCATE_AND_FREE], env=env, capture_output=True,
                                           text=True, check=True).stdout.split()
    return applied == "True", int(mapped), int(kept)


@pytest.mark.skipif(not glibc_with_mallinfo2(), reason="needs glibc >= 2.33 (other C libraries are left alone)")
def test_a_freed_block_of_a_forwards_size_stays_in_the_process():
    applied, mapped, kept = allocate_and_free(keep=False)
    assert not applied  # the opt-out
    assert mapped >= BLOCK and kept < BLOCK  # glibc's defaults: its own mmap, unmapped when freed
    applied, mapped, kept = allocate_and_free(keep=True)
    assert applied
    assert mapped == 0 and kept >= BLOCK  # from the heap, and still there after the free

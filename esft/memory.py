"""Keep freed heap memory inside the process, so a loop of forward passes stops paying page faults.

glibc returns freed memory to the kernel (mmap'd chunks at once, the heap's top once it exceeds a trim
threshold) and a fresh process starts with thresholds far below one forward's temporaries. A model
replica then re-faults its working set every batch: measured on the profiling bench's model (2 CPU
threads, 4 x 256 tokens), ~10,000 minor faults and 85-92 ms per batch, against ~0 faults and 52-67 ms once
freed memory is kept (bench/README.md, profiling). The cost is a resident size that stays at the peak,
which a process that holds a model and runs the same batch shape over and over reaches anyway.
"""

from __future__ import annotations

import ctypes
import functools
import os

_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # glibc's mallopt parameters (malloc.h)
MMAP_THRESHOLD = 32 << 20  # the largest glibc accepts on 64-bit (HEAP_MAX_SIZE / 2); bigger blocks stay mmap'd
TRIM_THRESHOLD = 1 << 30  # free memory at the heap's top beyond this still goes back to the kernel
OPT_OUT = "ESFT_KEEP_FREED_MEMORY"  # set to 0 to leave the C library's defaults alone


@functools.cache
def keep_freed_memory() -> bool:
    """Raise glibc's mmap and trim thresholds for this process (once); False where that is not possible
    (another C library, e.g. macOS or musl) or the user opted out with ESFT_KEEP_FREED_MEMORY=0."""
    if os.environ.get(OPT_OUT, "1") == "0":
        return False
    try:
        mallopt = ctypes.CDLL(None).mallopt  # the C library this process already runs on
    except (OSError, AttributeError, TypeError):  # TypeError: no process-wide handle (Windows)
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    return mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD) == 1 and mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD) == 1

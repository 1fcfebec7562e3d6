"""Keep freed CPU memory in the process heap during training (glibc only).

glibc serves every allocation above its mmap threshold (at most 32 MiB) with a fresh ``mmap`` and
returns it to the kernel on ``free``; the next tensor of that size faults in and zeroes its pages
again. A DMS training step at 1024 tokens makes hundreds of such tensors (per layer, attention
scores of 9 heads x 1024 x 1024 floats; logits of 1024 x 49152), and on the 2-core machine this cost
half the step: 12.8 s against 6.5 s with mmap disabled (docs/dms.md, "Training on this CPU").
:func:`retain_freed_memory` turns mmap off and raises the trim threshold for the length of a
``with`` block, then puts the glibc defaults back and returns the freed heap to the kernel.
Elsewhere (another C library, macOS) it does nothing.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import sys
from contextlib import contextmanager

M_TRIM_THRESHOLD = -1
M_MMAP_MAX = -4
DEFAULT_MMAP_MAX = 65536  # glibc's default
DEFAULT_TRIM_THRESHOLD = 128 * 1024  # glibc's default
RETAIN_TRIM_THRESHOLD = 2 ** 31 - 1  # mallopt takes an int: keep up to 2 GiB of free heap


def _glibc():
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        libc.mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
        libc.malloc_trim.argtypes = [ctypes.c_size_t]
        ctypes.CDLL(None).gnu_get_libc_version  # musl has mallopt as a stub; only glibc honours it
        return libc
    except (OSError, AttributeError):
        return None


@contextmanager
def retain_freed_memory(enabled: bool = True):
    """Inside the block, freed memory stays in the heap for reuse. Yields whether it took effect.

    On exit mmap comes back and the trim threshold returns to glibc's defaults (as fixed values:
    glibc's dynamic threshold adjustment stays off, as after ``MALLOC_TRIM_THRESHOLD_=131072``).
    """
    libc = _glibc() if enabled else None
    applied = bool(libc and libc.mallopt(M_MMAP_MAX, 0) == 1
                   and libc.mallopt(M_TRIM_THRESHOLD, RETAIN_TRIM_THRESHOLD) == 1)
    try:
        yield applied
    finally:
        if libc is not None:
            libc.mallopt(M_MMAP_MAX, DEFAULT_MMAP_MAX)
            libc.mallopt(M_TRIM_THRESHOLD, DEFAULT_TRIM_THRESHOLD)
            libc.malloc_trim(0)

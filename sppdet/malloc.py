"""Large blocks kept in the process between steps (glibc only).

glibc's malloc serves each block over its mmap threshold (at most 32 MB by default) with a fresh ``mmap`` and
unmaps it when freed, so a training loop that allocates the same large tensors every step (fine-tuning's
23,600 x 1024 fc6 gradient: 97 MB) pays the kernel's page faults on every one of their pages, every step: on
2 cores that was a third of the fc step's time. Within :func:`large_blocks_reused` such blocks come from the heap
and are reused once freed; afterwards the thresholds are set back and the heap's free top returned to the kernel.
Elsewhere (macOS, musl) it does nothing.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import sys

__all__ = ["large_blocks_reused"]

_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3
_DEFAULT_MMAP, _DEFAULT_TRIM = 32 << 20, 64 << 20  # what glibc's dynamic thresholds reach with large blocks


def _glibc():
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        return libc if hasattr(libc, "mallopt") and hasattr(libc, "malloc_trim") else None
    except OSError:
        return None


@contextlib.contextmanager
def large_blocks_reused(limit: int = 256 << 20):
    """Blocks up to ``limit`` bytes come from (and return to) the heap inside the block; yields whether glibc
    took the setting. Larger ones (the SVM stage's negative pool as it doubles) are still mapped apart: kept on
    the heap, their freed predecessors were fragments no later block fitted (fruit's SVM stage: 8.6 GB peak with
    a 1 GB limit)."""
    libc = _glibc()
    ok = bool(libc is not None and libc.mallopt(_M_MMAP_THRESHOLD, int(limit))
              and libc.mallopt(_M_TRIM_THRESHOLD, int(limit)))
    try:
        yield ok
    finally:
        if libc is not None:
            libc.mallopt(_M_MMAP_THRESHOLD, _DEFAULT_MMAP)
            libc.mallopt(_M_TRIM_THRESHOLD, _DEFAULT_TRIM)
            libc.malloc_trim(0)

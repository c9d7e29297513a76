"""Keep freed memory in the process (Linux, glibc) for CPU training.

A training step frees and allocates the same large tensors every time. glibc hands any block
over 32 MB back to the kernel when it is freed (munmap), and the kernel zeroes each page again
when the next step touches it. On CPU that is a noticeable share of a training step, and larger
for a stack of K, whose temporaries are K times larger (the README's benchmark section has the
figures, from `sae-ray bench train`). With glibc's mmap and trimming off, freed blocks stay
in the heap and the next step reuses them. The price: the process keeps its peak memory until
it exits, so only our own training and benchmark processes turn it on, never `train_sae` itself.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import sys

M_TRIM_THRESHOLD = -1
M_MMAP_MAX = -4


def keep_freed_memory() -> bool:
    """From now on, keep freed memory in this process for reuse (glibc's mallopt: no mmap for
    large blocks, no trimming of the heap). Returns False, changing nothing, where that is not
    possible (not Linux, or a C library without mallopt)."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # e.g. musl: no mallopt
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    # -1 turns trimming off altogether (mallopt(3)); both return 1 on success
    return mallopt(M_MMAP_MAX, 0) == 1 and mallopt(M_TRIM_THRESHOLD, -1) == 1

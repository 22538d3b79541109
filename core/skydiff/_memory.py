r"""Keep freed memory in the process (private; used by the ``skydiff`` command).

NumPy gets arrays of more than 128 KiB from glibc's ``malloc``, which maps each one afresh
(``mmap``) and returns it to the kernel when it is freed (``munmap``). A subtraction of a
2048 × 4096 pair allocates and frees about 18 full-frame arrays of 32–35 MB, and every one
is then faulted in again page by page on first touch. On a virtual machine that returns
freed guest memory to its host (Firecracker here), those faults cost 4 ms to more than
50 ms per array and change from run to run: up to half of a subtraction's time.

:func:`retain_freed_memory` sets glibc's ``M_MMAP_THRESHOLD`` and ``M_TRIM_THRESHOLD`` high
(``mallopt``): large arrays then come from the heap, and freed ones stay there for the next
allocation. The process's resident memory stays at its peak instead of shrinking between
frames; a pipeline of same-sized frames reuses it. Elsewhere than glibc it does nothing.
The same settings can be given to any Python process through glibc's environment
variables ``MALLOC_MMAP_THRESHOLD_`` and ``MALLOC_TRIM_THRESHOLD_``.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import sys

__all__ = ["OPT_OUT", "is_retained", "retain_freed_memory"]

#: Environment variable: ``0`` keeps glibc's defaults in the ``skydiff`` command.
OPT_OUT = "SKYDIFF_RETAIN_MEMORY"

# glibc <malloc.h>
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3

#: The largest value mallopt takes (an int): allocations below 2 GiB come from the heap.
_THRESHOLD = 2**31 - 1

_retained = False


def is_retained() -> bool:
    """Whether :func:`retain_freed_memory` has applied its settings in this process."""
    return _retained


def retain_freed_memory() -> bool:
    """Make glibc keep freed memory for reuse; True if the settings were applied.

    Does nothing (False) when ``SKYDIFF_RETAIN_MEMORY=0``, off Linux, or without glibc.
    """
    if os.environ.get(OPT_OUT, "").strip() == "0" or not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # musl and others have no mallopt
        return False
    mallopt.argtypes = (ctypes.c_int, ctypes.c_int)
    mallopt.restype = ctypes.c_int
    global _retained
    _retained = bool(mallopt(_M_MMAP_THRESHOLD, _THRESHOLD)
                     and mallopt(_M_TRIM_THRESHOLD, _THRESHOLD)) or _retained
    return _retained

"""Large blocks that a CPU teacher frees, kept for its next forward instead of handed back to the OS.

A forward of a convolutional teacher on the CPU allocates activations of tens to hundreds of MB and frees them.
glibc's allocator serves blocks that large with ``mmap`` and unmaps them on ``free``, so the next forward page-faults
every page of them back in, zeroed by the kernel: on this project's 2-core machine EfficientNet-Lite0 spent more
time in the kernel than in its own arithmetic (``python scripts/bench_cpu_teacher.py``, ``results/bench_cpu_teacher.md``).
:func:`reuse_freed_memory` tells glibc (``mallopt``) to serve such blocks from its heap and to keep freed memory
there, which is what jemalloc or tcmalloc, the allocators PyTorch's CPU tuning guides preload, do on their own.
The process then keeps its peak memory instead of returning it between forwards. A teacher ensemble on the CPU
calls it when it is made (:class:`dr_hf.TeacherEnsemble`); ``DR_HF_REUSE_FREED_MEMORY=0`` in the environment leaves
glibc's default.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import os

_M_TRIM_THRESHOLD = -1  # <malloc.h>: keep this much free memory at the top of the heap before returning it
_M_MMAP_THRESHOLD = -3  # <malloc.h>: serve blocks below this size from the heap, not from mmap
_LARGEST = 2**31 - 1  # mallopt takes an int
ENV_SWITCH = "DR_HF_REUSE_FREED_MEMORY"


@functools.lru_cache(maxsize=None)
def reuse_freed_memory() -> bool:
    """Make this process's C allocator keep and reuse large freed blocks (glibc only; process-wide, for the rest of
    the process, so done once however often it is called). Returns whether it applied: ``False`` where the C library
    is not glibc (macOS, musl) or the environment says ``DR_HF_REUSE_FREED_MEMORY=0``."""
    if os.environ.get(ENV_SWITCH, "1").strip() == "0":
        return False
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name)
        mallopt = libc.mallopt
        libc.gnu_get_libc_version  # noqa: B018  (glibc's, absent from other C libraries)
    except (OSError, AttributeError, TypeError):
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    return bool(mallopt(_M_MMAP_THRESHOLD, _LARGEST)) and bool(mallopt(_M_TRIM_THRESHOLD, _LARGEST))

"""Tensor work run as one TorchScript call, without the GIL.

Called from Python, every torch op lets go of the GIL and must take it back. A GPU job's render thread runs beside
threads that hold it (the preparing threads drawing parameters, the main thread), and a teacher batch's batched
render is hundreds of small ops, so from Python it waits for the GIL op after op (run E's trace on the H100: 8.4 of
each 14.6 ms; ``results/bench_gpu.md``). :func:`call` runs such a function compiled by TorchScript instead: the same
ops in the same order (the same results, bit for bit), in C++, unoptimised (no fusion: the ops torch runs eagerly).
"""

from __future__ import annotations

import threading
import warnings
from typing import Callable, Dict

import torch

ENABLED = True
"""Whether :func:`call` runs functions compiled by TorchScript (the default) or from Python, op by op (the same
results; ``bench_gpu_ab.py --arms script_off`` measures what it gives)."""

_COMPILED: Dict[Callable, Callable] = {}
_COMPILING = threading.Lock()


def call(fn: Callable, *args):
    """``fn(*args)``, ``fn`` compiled by TorchScript on first use (once, whichever thread gets there first). A torch
    that cannot compile it gets a RuntimeWarning naming the error, and ``fn`` from Python."""
    if not ENABLED:
        return fn(*args)
    compiled = _COMPILED.get(fn)
    if compiled is None:
        with _COMPILING:
            compiled = _COMPILED.get(fn) or _compile(fn)
    with torch.jit.optimized_execution(False):  # (this thread only)
        return compiled(*args)


def _compile(fn: Callable) -> Callable:
    try:
        with warnings.catch_warnings():  # torch >= 2.10 marks TorchScript deprecated: still its GIL-free way
            warnings.simplefilter("ignore", FutureWarning)
            compiled = torch.jit.script(fn)
    except Exception as error:  # (a torch without TorchScript): the same function, from Python
        warnings.warn(f"TorchScript could not compile {fn.__module__}.{fn.__qualname__} ({type(error).__name__}: "
                      f"{error}); it runs op by op from Python: the same results, more host time beside other threads",
                      RuntimeWarning)
        compiled = fn
    _COMPILED[fn] = compiled
    return compiled

"""Batch memory that DataLoader workers reuse once the training process is done with it.

A worker hands each batch to the training process in shared memory; ``default_collate`` (and, before this module,
dr-hf's collators) allocate it afresh for every batch, and a fresh shared-memory block costs the worker a page fault
and a zeroed page for every 4 KiB it writes. A :class:`BatchPool` keeps a few blocks per worker and writes each new
batch into one the training process has let go: 2 workers hand over 2.7x the empty float batches of 32 x 224 px
(``python scripts/bench_rows.py``), and replay 1.17x the images/s, 1.22x with ``replay_on_device``'s JPEG bytes
(``python scripts/bench_loader.py``).

How a block comes back: the worker marks it busy in a one-word flag of its own (shared memory) and sends the batch
tensor as a :class:`LeasedTensor`, which arrives in the training process as a plain tensor again, with a finalizer
on its storage that clears the flag when that storage is freed: when no tensor, view or autograd record in the
training process uses the memory any more (in that process only: a forked copy of it freeing its copy releases
nothing). A block whose flag is still set is never written; when every pooled
block is busy, the worker falls back to a fresh block, so recycling never waits and never loses a batch.

What the training process frees is all the worker can see: code that hands a batch tensor on to yet another process
(``torch.multiprocessing``, which shares the memory itself rather than copying it) must hand over a clone.
"""

from __future__ import annotations

import math
import os
import weakref
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch

_BUSY = 1


def shared_empty(size: Sequence[int], dtype: torch.dtype) -> torch.Tensor:
    """An uninitialised contiguous CPU tensor in shared memory, as ``default_collate`` allocates in DataLoader
    workers: it crosses into the training process without another copy."""
    storage = torch.UntypedStorage._new_shared(math.prod(size) * dtype.itemsize)
    return torch.empty(0, dtype=dtype).set_(storage, 0, tuple(size))


def _arrive(tensor: torch.Tensor, flag: torch.Tensor) -> torch.Tensor:
    """(In the training process, unpickling a :class:`LeasedTensor`.) The batch tensor, whose block is handed back to
    its worker's pool (the flag cleared) once its storage is freed here."""
    word = flag.numpy()  # cleared without torch's dispatcher: finalizers run wherever the last reference goes
    finalizer = weakref.finalize(tensor.untyped_storage(), _release, word, os.getpid())
    finalizer.atexit = False
    return tensor


def _release(word, owner: int) -> None:
    """Clear a block's flag, in the process that received the block only: a forked copy of it (which inherits the
    storage and its finalizer) freeing its copy says nothing about the original's."""
    if os.getpid() == owner:
        word.fill(0)


class LeasedTensor(torch.Tensor):
    """A pooled batch tensor on its way from a worker to the training process. In the worker it is a tensor like
    any other (operations on it give plain tensors); pickled to the training process, it arrives as a plain tensor
    whose block goes back to the worker's pool once its storage is freed there."""

    __torch_function__ = torch._C._disabled_torch_function_impl

    @staticmethod
    def of(tensor: torch.Tensor, flag: torch.Tensor) -> "LeasedTensor":
        leased = tensor.as_subclass(LeasedTensor)
        leased._dr_flag = flag
        return leased

    def __reduce_ex__(self, protocol):
        return _arrive, (self.as_subclass(torch.Tensor), self._dr_flag)


class BatchPool:
    """Up to ``blocks`` shared-memory blocks, each reused once the training process has freed it."""

    def __init__(self, blocks: int = 8):
        if blocks < 0:
            raise ValueError(f"blocks must be >= 0, got {blocks}")
        self.blocks = blocks
        self.reused = self.allocated = 0  # blocks handed out again / afresh (pooled or not)
        self._pool: List[Tuple[torch.Tensor, torch.Tensor]] = []  # (uint8 block, its int32 flag)
        self._lent: Dict[int, torch.Tensor] = {}  # data_ptr of a block handed out by `empty` -> its flag

    def empty(self, size: Sequence[int], dtype: torch.dtype = torch.uint8) -> torch.Tensor:
        """An uninitialised contiguous tensor in shared memory: the front of the smallest free pooled block that
        holds it, else of a new block (which replaces a free one too small, so that blocks grow to what a worker
        sends), else, with every block busy, a fresh tensor outside the pool."""
        n = math.prod(size) * dtype.itemsize
        free = [k for k, (_, flag) in enumerate(self._pool) if flag.item() != _BUSY]
        fits = [k for k in free if self._pool[k][0].numel() >= n]
        if fits:
            self.reused += 1
            k = min(fits, key=lambda k: self._pool[k][0].numel())
        else:
            self.allocated += 1
            if not free and len(self._pool) >= self.blocks:
                return shared_empty(size, dtype)
            k = free[0] if free else len(self._pool)
            self._pool[k:k + 1] = [(shared_empty((max(n + n // 8, 1 << 20),), torch.uint8),
                                   shared_empty((1,), torch.int32))]
        block, flag = self._pool[k]
        return self._lend(block, flag)[:n].view(dtype).view(tuple(size))

    def _lend(self, block: torch.Tensor, flag: torch.Tensor) -> torch.Tensor:
        flag.fill_(_BUSY)
        self._lent[block.data_ptr()] = flag
        return block

    def leased(self, value: Any) -> Any:
        """A tensor on a block lent by :meth:`empty` (the block or a view of it) as a
        :class:`LeasedTensor`, so that the block comes back when the training process frees it; anything else as is."""
        flag = None
        if isinstance(value, torch.Tensor) and value.device.type == "cpu":
            flag = self._lent.pop(value.untyped_storage().data_ptr(), None)
        return value if flag is None else LeasedTensor.of(value, flag)

    def lease(self, batch: Dict[str, Any]) -> Dict[str, Any]:
        """``batch`` to return from a collator, each value :meth:`leased`."""
        return {name: self.leased(value) for name, value in batch.items()}

    def give_back(self) -> None:
        """Blocks lent but not leased (a collator that failed midway): free for the next batch."""
        for flag in self._lent.values():
            flag.fill_(0)
        self._lent.clear()


_POOL: Optional[Tuple[int, BatchPool]] = None


def worker_pool() -> BatchPool:
    """This process's pool (a forked process starts its own: blocks are never shared between two writers)."""
    global _POOL
    if _POOL is None or _POOL[0] != os.getpid():
        _POOL = (os.getpid(), BatchPool())
    return _POOL[1]


def in_worker() -> bool:
    """Whether this process is a DataLoader worker, whose batches cross into the training process."""
    return torch.utils.data.get_worker_info() is not None


def batch_empty(size: Sequence[int], dtype: torch.dtype = torch.uint8) -> torch.Tensor:
    """An uninitialised contiguous CPU tensor to collate a batch into: in a DataLoader worker, from its pool (shared
    memory, recycled; hand the batch over through :func:`handed_over`), elsewhere plain memory."""
    return worker_pool().empty(size, dtype) if in_worker() else torch.empty(tuple(size), dtype=dtype)


def handed_over(batch: Any) -> Any:
    """A batch (a dict of values, or one tensor) as a collator returns it: in a DataLoader worker, the tensors on its
    pool's blocks leased to the training process (:meth:`BatchPool.lease`); elsewhere as is."""
    if not in_worker():
        return batch
    return worker_pool().lease(batch) if isinstance(batch, dict) else worker_pool().leased(batch)

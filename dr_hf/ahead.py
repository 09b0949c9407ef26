"""Work computed ahead of its consumer on a thread pool, in order, with a bound on what is held: the reinforce job's
preparing and render threads, and the trainer's rendering on the device (:class:`~dr_hf.replay.RenderedAhead`); a
streamed source's next shard read while the current one is computed (:func:`read_ahead`); and GPU work queued on a
stream of its own (:class:`SideStream`)."""

from __future__ import annotations

from collections import deque
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable, Deque, Iterable, Iterator, Optional, Sequence, Tuple

import torch


def prefetched(items: Iterable[Any], fn: Callable[[Any], Any], threads: int) -> Iterator[Tuple[Any, Any]]:
    """``(item, fn(item))`` in order, computing up to ``threads + 1`` items ahead on a thread pool (0: inline)."""
    if threads <= 0:
        for item in items:
            yield item, fn(item)
        return
    with ThreadPoolExecutor(threads, thread_name_prefix="dr-render") as pool:
        yield from computed_ahead(items, lambda item: (item, fn(item)), threads + 1, pool)


def computed_ahead(items: Iterable[Any], fn: Callable[[Any], Any], ahead: int, pool) -> Iterator[Any]:
    """``fn(item)`` for each item, in order, computed on ``pool`` (an executor) up to ``ahead`` items beyond the one
    being consumed, so that at most ``ahead + 1`` results are held; what is pending when the consumer stops is
    cancelled."""
    pending: Deque = deque()
    try:
        for item in items:
            pending.append(pool.submit(fn, item))
            if len(pending) > ahead:
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()
    finally:
        for future in pending:
            future.cancel()


def read_ahead(items: Iterable[Any], ahead: int = 1, name: str = "dr-read") -> Iterator[Any]:
    """The items of ``items``, in order, read by a thread of their own up to ``ahead`` items beyond the one being
    consumed (``items`` is advanced only there), so that at most ``ahead + 1`` items are held: a stream's next shard
    read while the current one is computed. An error in the thread is raised here, at the item it was reading; a
    consumer that stops early stops the thread once it has read the item it was reading."""
    import queue
    import threading

    read: "queue.Queue" = queue.Queue()
    permits = threading.Semaphore(ahead)  # one per item read or being read and not yet taken by the consumer
    stop = threading.Event()
    done = object()

    def produce():
        try:
            it = iter(items)
            while True:
                while not permits.acquire(timeout=0.1):
                    if stop.is_set():
                        return
                if stop.is_set():
                    return
                item = next(it, done)
                read.put((item, None))
                if item is done:
                    return
        except BaseException as exc:  # raised in the consumer
            read.put((done, exc))

    thread = threading.Thread(target=produce, name=name, daemon=True)
    thread.start()
    try:
        while True:
            item, exc = read.get()
            if exc is not None:
                raise exc
            if item is done:
                return
            permits.release()  # the consumer holds this one now: the thread may read the next
            yield item
    finally:
        stop.set()  # (not joined: a consumer that stops on an error should not wait for the item being read)


class SideStream:
    """Work queued on a CUDA stream of its own, so that its copies and kernels wait only for each other, not for the
    work on the caller's stream (on other devices, or with ``enabled`` off, the caller's stream: a no-op).
    ``with side.queue():`` queues work there (from any thread); :meth:`done` marks what was queued; :meth:`hand_over`
    makes the caller's stream wait for a mark before it uses the ``tensors`` made there, and tells torch's allocator
    that they are used there too."""

    def __init__(self, device, enabled: bool = True):
        self.stream = torch.cuda.Stream(device) if enabled and torch.device(device).type == "cuda" else None

    def queue(self):
        return torch.cuda.stream(self.stream)  # (a no-op for None)

    def done(self) -> Optional[torch.cuda.Event]:
        return self.stream.record_event() if self.stream is not None else None

    @staticmethod
    def hand_over(event: Optional[torch.cuda.Event], tensors: Sequence[torch.Tensor]) -> None:
        if event is None:
            return
        stream = torch.cuda.current_stream(tensors[0].device)
        stream.wait_event(event)
        for t in tensors:
            t.record_stream(stream)

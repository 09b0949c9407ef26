"""Work computed ahead of its consumer on a thread pool, in order, with a bound on what is held: the reinforce job's
preparing and render threads, and the trainer's rendering on the device (:class:`~dr_hf.replay.RenderedAhead`)."""

from __future__ import annotations

from collections import deque
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable, Deque, Iterable, Iterator, Tuple


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

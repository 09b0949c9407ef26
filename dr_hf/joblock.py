"""One job per output folder: a lock the reinforce job holds for its whole run, and ``dr-hf push`` for its upload.

The main process takes ``OUTPUT/.dr-hf.lock`` (``filelock``, as ``datasets`` and ``huggingface_hub`` use) and records
who holds it in ``OUTPUT/.dr-hf.lock.json``; the other processes of the same ``accelerate``/``torchrun`` job wait at a
barrier until it has, so the ranks of one job share the lock. A second job is refused at once, naming the folder and
the holder, or waits for it (``wait=True``); so is a push while a job writes the folder, and a job while a push
reads it (the record names the push's repo, never its arguments: they may hold a token). The lock is an OS file
lock: a job killed with ``kill -9`` releases it with its process, so the rerun that resumes it is not blocked.
(Network file systems without ``flock`` support are not covered.) A job of processes that do not share the folder
(several machines, each writing to its own disk) is refused at its start (:func:`check_shared`).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import socket
import sys
import time
from typing import Iterator, Optional

from .processes import Processes

logger = logging.getLogger(__name__)
LOCK = ".dr-hf.lock"


class FolderInUse(RuntimeError):
    """Another job holds the output folder."""


class FolderNotShared(RuntimeError):
    """The job's processes do not see one output folder."""


def holder(folder: str) -> str:
    """Who holds (or last held) the lock on ``folder``, in words."""
    try:
        with open(os.path.join(folder, LOCK + ".json")) as f:
            info = json.load(f)
        return f"pid {info['pid']} on {info['host']}, started {info['started']}: {info['command']}"
    except (OSError, ValueError, KeyError):
        return "another process"


@contextlib.contextmanager
def output_lock(folder: str, procs: Processes, wait: bool = False, command: Optional[str] = None) -> Iterator[None]:
    """Hold the output folder's lock for the job (main process), with the job's other processes behind a barrier.
    ``command``: what the holder's record says it runs (default: the ``dr-hf reinforce`` command line, or
    ``dr_hf.reinforce()``)."""
    from filelock import FileLock, Timeout

    os.makedirs(folder, exist_ok=True)
    lock = FileLock(os.path.join(folder, LOCK))
    if procs.is_main:
        try:
            lock.acquire(timeout=0)
        except Timeout:
            if not wait:
                raise FolderInUse(f"`output_dir` {folder} is in use by another dr-hf job ({holder(folder)}); wait for it "
                                  "(`wait`), or choose another `output_dir`") from None
            logger.info("%s is in use (%s): waiting for it", folder, holder(folder))
            lock.acquire()
        info = {"pid": os.getpid(), "host": socket.gethostname(), "started": time.strftime("%Y-%m-%d %H:%M:%S"),
                "command": command or (" ".join(["dr-hf", *sys.argv[1:]]) if sys.argv[1:2] == ["reinforce"]
                                       else "dr_hf.reinforce()")}
        with open(os.path.join(folder, LOCK + ".json"), "w") as f:
            json.dump(info, f)
    procs.wait()  # the other ranks start once the main process holds the folder
    try:
        check_shared(folder, procs)
        yield
    finally:
        if procs.is_main:
            lock.release()


SHARE_PATIENCE_S = 30.0  # how long check_shared waits for every process's mark to show


def check_shared(folder: str, procs: Processes, patience: Optional[float] = None) -> None:
    """Refuse a job whose processes do not share ``folder`` (processes on several machines writing to local disks:
    the main process would wait for the others' shards to the end, and then forever). Only processes that run at once
    (:attr:`~dr_hf.processes.Processes.together`) are checked; parts of a job run one at a time are not. Each process
    writes a mark with a number the main process drew, then looks for every process's (for ``patience`` seconds,
    default ``SHARE_PATIENCE_S``: network file systems can show new files late)."""
    if not procs.together:  # (parts of a job run one at a time cannot see one another's marks)
        return
    token = str(procs.shared_token())
    patience = SHARE_PATIENCE_S if patience is None else patience

    def mark(rank: int) -> str:
        return os.path.join(folder, f"{LOCK}.process-{rank}")

    def written(rank: int) -> str:
        try:
            with open(mark(rank)) as f:
                return f.read()
        except OSError:
            return ""

    with open(mark(procs.rank), "w") as f:
        f.write(token)
    procs.wait()
    deadline = time.monotonic() + patience
    while True:
        unseen = [r for r in range(procs.world) if written(r) != token]
        if not unseen or time.monotonic() > deadline:
            break
        time.sleep(min(1.0, patience / 10))
    if unseen:
        raise FolderNotShared(f"`output_dir` {folder} is not shared by the job's processes: {procs} does not see what "
                              f"process(es) {unseen} wrote there. Processes on several machines need it on a file "
                              "system they all mount (every process writes its shards to it, and the main process "
                              "the card)")
    procs.wait()  # every process has looked
    os.remove(mark(procs.rank))

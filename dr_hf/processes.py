"""Which process this is: one plain process, or one of many under ``accelerate launch`` / ``torchrun``."""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Optional

import torch


@dataclass
class Processes:
    """This process's rank among ``world`` processes, and the device its teacher runs on."""

    rank: int = 0
    world: int = 1
    device: Optional[str] = None

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def shards(self, num_shards: int) -> range:
        """A contiguous share of ``range(num_shards)``: rank r gets shards [r*S/W, (r+1)*S/W)."""
        return range(self.rank * num_shards // self.world, (self.rank + 1) * num_shards // self.world)

    def wait(self) -> None:
        """A barrier across the job's processes (nothing to wait for in a single process)."""
        if self.world > 1:
            from accelerate import PartialState

            PartialState().wait_for_everyone()

    @property
    def together(self) -> bool:
        """Whether the job's processes run at once, in one process group (``accelerate launch``, ``torchrun``), rather
        than one at a time (a ``Processes(rank, world)`` given for each part of a job, as array jobs run them)."""
        return self.world > 1 and torch.distributed.is_available() and torch.distributed.is_initialized()

    def shared_token(self) -> int:
        """A random number the main process draws and every process of the job receives (a tensor broadcast, so only
        for processes that run :attr:`together`)."""
        import secrets

        from accelerate import PartialState

        value = torch.tensor([secrets.randbits(62) if self.is_main else 0], dtype=torch.int64,
                             device=PartialState().device)
        torch.distributed.broadcast(value, src=0)
        return int(value.item())

    def __str__(self) -> str:
        return f"process {self.rank}/{self.world}"

    def tag(self, message: str) -> str:
        """``message`` as this process says it: prefixed with ``process r/w: `` in a job of several processes."""
        return f"{self}: {message}" if self.world > 1 else message


def launched() -> bool:
    """True under ``accelerate launch``, ``torchrun`` or ``mpirun`` with more than one process."""
    size = max(int(os.environ.get(k, "1") or 1) for k in ("WORLD_SIZE", "PMI_SIZE", "OMPI_COMM_WORLD_SIZE"))
    return size > 1


def current_processes(device: Optional[str] = None) -> Processes:
    """The process layout, from accelerate's ``PartialState`` when launched with several processes.

    ``device`` forces the teacher's device; by default each process takes its own GPU (``cuda:LOCAL_RANK``)
    or the CPU when there is none. On a CPU-only machine, ``accelerate launch --multi_gpu --num_processes N``
    or ``torchrun --nproc_per_node N`` starts N CPU processes (accelerate's ``--cpu`` flag starts just one).
    """
    if not launched():
        return Processes(device=device)
    from accelerate import PartialState

    cpu = (device or "").startswith("cpu") or not torch.cuda.is_available()
    state = PartialState(cpu=cpu)
    dev = device if device and not device.startswith("cuda") else str(state.device)
    if dev.startswith("cpu"):
        dev = "cpu"
    return Processes(rank=state.process_index, world=state.num_processes, device=dev)


def finish() -> None:
    """Tear down the process group, if one was started, once every process is past its last collective (gloo's
    worker threads otherwise can still hold work at interpreter exit, which aborts the process)."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()

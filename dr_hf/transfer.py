"""Host-to-device copies that do not make the host wait for the device.

A blocking copy to a GPU waits for all the work queued before it (a reinforce job's teacher forward) before the host
may queue more, and so, for a large tensor, may a non-blocking one from pageable memory, which CUDA stages through
pinned buffers of its own. :func:`to_device` is the one way dr-hf makes such a copy.
"""

from __future__ import annotations

import numpy as np
import torch


def to_device(data, device) -> torch.Tensor:
    """A host array or tensor on ``device``, without waiting for the device: to a GPU from a pinned copy of ``data``
    (which torch's pinned-memory cache keeps until the transfer is done, so ``data`` may change at once), or from
    ``data`` itself where it is pinned already (:func:`pinned`)."""
    tensor = data if isinstance(data, torch.Tensor) else torch.from_numpy(np.ascontiguousarray(data))
    return pinned(tensor, device).to(device, non_blocking=True)


def pinned(tensor: torch.Tensor, device) -> torch.Tensor:
    """``tensor`` in pinned host memory when it is bound for a GPU: a copy made by the calling thread (``tensor``
    itself when already pinned), so that a thread other than the one queuing the GPU's work can make it; else
    ``tensor``."""
    if torch.device(device).type == "cuda" and tensor.device.type == "cpu":
        return tensor.pin_memory()  # (torch returns a pinned tensor as it is)
    return tensor

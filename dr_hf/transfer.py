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
    (which torch's pinned-memory cache keeps until the transfer is done, so ``data`` may change at once)."""
    tensor = data if isinstance(data, torch.Tensor) else torch.from_numpy(np.ascontiguousarray(data))
    if torch.device(device).type == "cuda" and tensor.device.type == "cpu":
        tensor = tensor.pin_memory()
    return tensor.to(device, non_blocking=True)

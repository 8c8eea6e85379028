"""Host <-> device copies that never make the host wait for the device.

`torch.tensor(values, device="cuda")` copies from pageable memory, which synchronises the
stream: the host waits for every kernel queued before it, so a step prepared while the
previous one runs (async scheduling) would wait for it after all. These helpers stage through
pinned memory and copy without blocking; the caching host allocator keeps each pinned buffer
alive until its copy is done. On the CPU they are plain tensors.
"""
from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch


def to_device(values: Sequence[int] | Sequence[float] | np.ndarray, dtype: torch.dtype,
              device: torch.device) -> torch.Tensor:
    """A device tensor of `values`, its copy queued on the current stream (CUDA) without
    waiting for the kernels before it."""
    if isinstance(values, np.ndarray):
        host = torch.from_numpy(values).to(dtype)
    else:
        host = torch.tensor(values, dtype=dtype)
    if device.type != "cuda":
        return host
    return host.pin_memory().to(device, non_blocking=True)


def to_host(tensor: torch.Tensor) -> torch.Tensor:
    """Start copying a device tensor to (pinned) host memory. Its values are there once the
    stream reaches this point: record an event after the copies and wait on it before
    reading. A CPU tensor is returned as it is."""
    if tensor.device.type != "cuda":
        return tensor
    host = torch.empty(tensor.shape, dtype=tensor.dtype, pin_memory=True)
    return host.copy_(tensor, non_blocking=True)

"""Host values to the device, and device results to the host, without stalling the host.

`torch.tensor(values, device="cuda")` copies from pageable memory, which PyTorch follows with a stream synchronize:
the host then waits for every kernel already queued, so nothing can be prepared while the GPU works. A copy from
pinned memory with non_blocking=True is queued on the stream like a kernel instead (the caching host allocator keeps
the pinned buffer alive until the copy has run).
"""

from __future__ import annotations

import torch


def to_device(values: list | torch.Tensor, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """`values` (a list, or a host tensor) as a tensor on `device`, copied in stream order: no host sync."""
    on_gpu = device.type != "cpu"
    if isinstance(values, torch.Tensor):
        host = values.to(dtype)
        host = host.pin_memory() if on_gpu else host
    else:
        host = torch.tensor(values, dtype=dtype, pin_memory=on_gpu)
    return host.to(device, non_blocking=True) if on_gpu else host


def to_host(t: torch.Tensor | None) -> torch.Tensor | None:
    """A device tensor copied into pinned host memory in stream order; waiting for it (an event recorded after the
    copy) does not wait for work queued later, as a blocking .tolist() would. Host tensors and None pass through."""
    if t is None or t.device.type == "cpu":
        return t
    host = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
    return host.copy_(t, non_blocking=True)

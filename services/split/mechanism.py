"""How a `Split` is applied: prefill's pacing pause (every vendor), and on AMD prefill's stream chosen by CU share.

NVIDIA has no per-stream SM limit that PyTorch's streams accept across MPS clients, so there the split is time: prefill
paces itself and decode yields (controller.py). On AMD a stream can be created with a CU mask
(`hipExtStreamCreateWithCUMask`): `CuMaskStreams` makes one prefill stream per share of the ladder at start, and the
prefill worker runs each forward pass on the stream of the controller's current share (`prefill_gpu`). Written against
the HIP C API through ctypes and torch's ExternalStream, and tested with a fake HIP library and a fake torch.cuda on the
CPU; wired, not run on an AMD GPU (none was available).
"""

from __future__ import annotations

import ctypes
import logging
from collections.abc import Callable, Iterable
from typing import Any

import torch

from services.split.controller import LADDER

log = logging.getLogger("kvrelay.split")


def pacing_pause_s(compute_s: float, duty: float) -> float:
    """The idle time after a forward pass of compute_s that makes prefill compute `duty` of the time."""
    if duty >= 1.0 or compute_s <= 0:
        return 0.0
    return compute_s * (1.0 - duty) / max(duty, 1e-3)


def cu_mask(num_cus: int, share: float) -> list[int]:
    """The 32-bit words of a mask enabling floor(share * num_cus) CUs (at least one), taken evenly across the device:
    CU i is on when floor((i + 1) * share) > floor(i * share), so no block of adjacent CUs (one XCD of an MI300X, if the
    bit order follows the dies) is left out. Not checked against an MI300X's bit order (no card was lent)."""
    if num_cus < 1 or not 0 < share <= 1:
        raise ValueError(f"cu_mask needs num_cus >= 1 and 0 < share <= 1, got {num_cus}, {share}")
    on = [int((i + 1) * share + 1e-9) > int(i * share + 1e-9) for i in range(num_cus)]
    if not any(on):
        on[0] = True
    words = [0] * ((num_cus + 31) // 32)
    for i, bit in enumerate(on):
        if bit:
            words[i // 32] |= 1 << (i % 32)
    return words


class CuMaskStreams:
    """AMD: one HIP stream per CU share, created once (a stream's mask is fixed at creation)."""

    def __init__(self, num_cus: int, shares: Iterable[float], hip: Any = None) -> None:
        # hip: the HIP runtime library (libamdhip64.so); tests pass a fake with the same function
        self.hip = hip if hip is not None else ctypes.CDLL("libamdhip64.so")
        self.num_cus = num_cus
        self.handles: dict[float, int] = {}
        for share in sorted(set(shares)):
            words = cu_mask(num_cus, share)
            stream = ctypes.c_void_p()
            array = (ctypes.c_uint32 * len(words))(*words)
            err = self.hip.hipExtStreamCreateWithCUMask(ctypes.byref(stream), len(words), array)
            if err != 0:
                raise RuntimeError(f"hipExtStreamCreateWithCUMask({share:.2f} of {num_cus} CUs) failed: error {err}")
            self.handles[share] = stream.value

    def handle_for(self, share: float) -> int:
        """The stream of the largest share not above `share` (the smallest one if all are above)."""
        fits = [s for s in self.handles if s <= share + 1e-9]
        return self.handles[max(fits) if fits else min(self.handles)]

    def close(self) -> None:
        for handle in self.handles.values():
            self.hip.hipStreamDestroy(ctypes.c_void_p(handle))
        self.handles.clear()


class CuMaskGpu:
    """AMD, the split on: the prefill worker's `gpu` (OwnStream's `run`), running each forward pass on the CU-mask
    stream of the controller's current share, read at the start of the pass (a pass never changes stream midway).

    Passes on different streams need no ordering between them: each pass ends with its stream synchronized
    (services/prefill/server.py _compute, sync_device on the current stream). The streams live as long as the process
    (torch's ExternalStream never destroys the stream it wraps)."""

    def __init__(self, own: Any, streams: CuMaskStreams, share: Callable[[], float], device, cuda: Any) -> None:
        self.lock = own.lock  # the worker's one-pass-at-a-time lock, shared with whatever else uses its own stream
        self.masks = streams
        self.share = share
        self.cuda = cuda
        self.streams = {h: cuda.ExternalStream(h, device=device) for h in streams.handles.values()}

    def run(self, fn, *args):
        with self.lock:
            with self.cuda.stream(self.streams[self.masks.handle_for(self.share())]):
                return fn(*args)


def prefill_gpu(own: Any, device, split: bool, share: Callable[[], float], hip: Any = None, cuda: Any = None) -> Any:
    """The prefill worker's `gpu`: CU-mask streams (CuMaskGpu) on ROCm with the split on, else `own` (its OwnStream).
    Streams that cannot be made (no libamdhip64, a HIP error) log once and leave `own`: the split then paces only.
    hip and cuda: the HIP library and torch.cuda, or fakes of them (tests); cuda given stands for ROCm."""
    if not split or (cuda is None and not torch.version.hip):
        return own
    cuda = cuda if cuda is not None else torch.cuda
    try:
        num_cus = cuda.get_device_properties(device).multi_processor_count  # CUs on ROCm (304 on an MI300X)
        gpu = CuMaskGpu(own, CuMaskStreams(num_cus, [s.prefill_share for s in LADDER], hip), share, device, cuda)
        if own.stream is not None:
            own.stream.synchronize()  # what prepare() queued on the own stream is done before a CU-mask pass reads it
    except Exception as exc:  # noqa: BLE001 - an optimisation: prefill runs on its own stream without it
        log.warning("CU-mask streams unavailable (%s: %s); prefill runs on its own stream", type(exc).__name__, exc)
        return own
    log.info("prefill runs on CU-mask streams: shares %s of %d CUs", sorted(gpu.masks.handles), num_cus)
    return gpu

"""How a `Split` is applied: prefill's pacing pause (every vendor), and on AMD prefill's stream chosen by CU share.

NVIDIA has no per-stream SM limit that PyTorch's streams accept across MPS clients, so there the split is time: prefill
paces itself and decode yields (controller.py). On AMD a stream can be created with a CU mask
(`hipExtStreamCreateWithCUMask`): `CuMaskStreams` makes one prefill stream per share of the ladder at start, and the
prefill worker runs each forward pass on the stream of the controller's current share. Written against the HIP C API
through ctypes and tested with a fake library on the CPU; it has not run on an AMD GPU (none was available).
"""

from __future__ import annotations

import ctypes
from collections.abc import Iterable
from typing import Any


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

"""Programmatic dependent launch (PDL, NVIDIA Hopper and newer): a kernel is launched while the one before it on the
stream is still finishing, and waits on the device (`griddepcontrol.wait`) before it touches memory.

A batch-1 decode step is ~260 small kernels; between two of them a CUDA graph still leaves a gap of about a
microsecond (launch, block scheduling, prologue). With PDL that setup overlaps the previous kernel's tail. Every kernel
that takes part calls `wait()` before it reads anything, so it reads nothing before its predecessor (and, by
induction, every kernel before that) has completed and its writes are visible.

`trigger()` lets the next kernel's blocks be scheduled. The small single-wave kernels (norms, rotary, store_kv,
attention, activation) start with `enter()`: wait, then trigger. Triggering before the wait instead (the chain of
kernels after them launching at once and parking in their waits) measured no faster on an H200 (batch-1 decode,
fraction of the floor, alternating in one process: 0.793 / 0.803 against 0.801 / 0.802), and prefetching the next
GEMV's weights from such parked blocks was slower (kernels/triton_gemv.py), so it was dropped. The GEMVs and skinny
GEMMs trigger right after their wait (TRIGGER_AFTER_WAIT there): the next grid launches only once every program of
this one has triggered, so it never takes an SM from a later wave of this one, and its programs fill the SMs this
grid frees during its tail (H200, batch-1 decode 3.92-3.94 ms a step against 3.98 when they triggered after their
loop; batch 64 6.03-6.05 against 6.11-6.12). The split reduce triggers before its wait, so that o_proj's programs
read their first weight chunk during the attention. Off on ROCm, on the CPU (the interpreter) and before sm_90
(`has_pdl` decides by compile target, the one place that does); KVRELAY_PDL=0 turns it off.
"""

from __future__ import annotations

import functools
import os

import torch
import triton
import triton.language as tl
from triton.backends.compiler import GPUTarget


def has_pdl(target: GPUTarget) -> bool:
    """Whether kernels compiled for `target` may use PDL (the PDL constexpr): NVIDIA sm_90 and newer
    (`griddepcontrol`). No AMD GPU has it: for gfx942 (MI300X) the kernels compile without it (the `if PDL:` branches
    below are not generated), as tests/kernels/compile_gfx942.py checks."""
    return target.backend == "cuda" and int(target.arch) >= 90


def device_target(device_index: int) -> GPUTarget:
    """The compile target of a visible GPU: ("hip", "gfx942", 64) on an MI300X, ("cuda", 90, 32) on an H100."""
    props = torch.cuda.get_device_properties(device_index)
    if torch.version.hip is not None:
        return GPUTarget("hip", props.gcnArchName.split(":")[0], 64)
    return GPUTarget("cuda", props.major * 10 + props.minor, 32)


@functools.cache
def _enabled(device_index: int) -> bool:
    if os.environ.get("KVRELAY_PDL", "1") == "0":
        return False
    return has_pdl(device_target(device_index))


def launch_options(device: torch.device) -> dict:
    """Keyword arguments for a kernel launch: the PDL constexpr and, where enabled, launch_pdl."""
    if device.type != "cuda" or not _enabled(device.index if device.index is not None else torch.cuda.current_device()):
        return {"PDL": False}
    return {"PDL": True, "launch_pdl": True}


@triton.jit
def wait(PDL: tl.constexpr):
    if PDL:
        tl.extra.cuda.gdc_wait()


@triton.jit
def trigger(PDL: tl.constexpr):
    if PDL:
        tl.extra.cuda.gdc_launch_dependents()


@triton.jit
def enter(PDL: tl.constexpr):
    """A small kernel's first line: wait for the previous kernel, then let the next one launch."""
    wait(PDL)
    trigger(PDL)

"""The compile target a launch runs on, and what the launch configs depend on per target: one place.

A kernel's launch config (tile sizes, num_warps, num_stages, register cap) is chosen by its launch function from the
target it runs on: `device_target` (None on the CPU, where the interpreter runs and every kernel keeps its NVIDIA
defaults, which it ignores). The NVIDIA choices were measured (H100/H200); the AMD ones below are compiled, not
measured: tests/kernels/compile_gfx942.py compiles each kernel as its launch function configures it for gfx942
(MI300X) and gfx950 (MI350X) and checks it for spills, LDS and >= 2 waves per SIMD.

Imports: torch, triton and kernels/pdl.py only (every kernel module may import this one).
"""

from __future__ import annotations

import functools

import torch
from triton.backends.compiler import GPUTarget

from kernels import pdl

# LDS (shared memory) a CU has: 64 KiB on CDNA3 (gfx942, MI300X), 160 KiB on CDNA4 (gfx950, MI350X); unknown AMD
# archs are taken as CDNA3. LLVM AMDGPUUsage "Memory Spaces"; AMD's CDNA3 ISA guide.
AMD_LDS_PER_CU = {"gfx942": 64 * 1024, "gfx950": 160 * 1024}
# Bytes of shared memory a program's pipeline stages may take on NVIDIA (an H100/H200 SM has 227 KB for one program).
NVIDIA_SHARED_MEMORY_BUDGET = 200 * 1024
# Programs (workgroups of 4 waves, one a SIMD) an AMD CU keeps resident at the least: the 2 waves/SIMD floor of
# tests/kernels/test_compile_gfx942.py (a SIMD hides a load's latency only by issuing from another wave).
AMD_MIN_WORKGROUPS_PER_CU = 2


def is_amd(target: GPUTarget | None) -> bool:
    return target is not None and target.backend == "hip"


def is_nvidia(target: GPUTarget | None) -> bool:
    return target is not None and target.backend == "cuda"


def lds_per_cu(arch: str) -> int:
    return AMD_LDS_PER_CU.get(arch, AMD_LDS_PER_CU["gfx942"])


def shared_memory_budget(target: GPUTarget | None) -> int:
    """Bytes of shared memory (LDS) one program's pipeline stages may take on target: NVIDIA's 200 KB (and on the
    CPU); on AMD the CU's LDS shared by AMD_MIN_WORKGROUPS_PER_CU programs (32 KiB on gfx942, 80 KiB on gfx950)."""
    if is_amd(target):
        return lds_per_cu(str(target.arch)) // AMD_MIN_WORKGROUPS_PER_CU
    return NVIDIA_SHARED_MEMORY_BUDGET


@functools.cache
def _gpu_target(index: int) -> GPUTarget:
    return pdl.device_target(index)


def device_target(device: torch.device) -> GPUTarget | None:
    """The compile target of `device`: GPUTarget("hip", "gfx942", 64) on an MI300X, ("cuda", 90, 32) on an H100, None
    on the CPU. Host-only query, cached: fine during graph capture."""
    if device.type != "cuda":
        return None
    return _gpu_target(device.index if device.index is not None else torch.cuda.current_device())

"""Compiles the Triton kernels' variants for AMD CDNA3, gfx942 (MI300X), and gfx950 (MI350X) where the installed
Triton knows it, and prints, as one line of JSON, {"targets": {arch: {"variants": {variant: facts}, "as_launched":
{variant: facts}} or {"unknown": why}}, "limits": {...}}.

Run by tests/kernels/test_compile_gfx942.py in a child process without TRITON_INTERPRET. Needs no GPU and no ROCm:
Triton's wheel carries the AMDGPU LLVM backend (the assembler, and lld linked into libtriton for the hsaco), so
`triton.compile(..., target=GPUTarget("hip", "gfx942", 64))` gives the amdgcn and the hsaco on this machine.

The variants are those compile_sm90.py compiles (tests/kernels/compile_variants.py, one enumeration), as a ROCm
launch chooses them: no PDL (kernels/pdl.py `has_pdl`), fp8 KV as its arch's flavour (kvstore/formats.py
`fp8_dtype_for_arch`: e4m3fnuz on gfx942, `tl.float8e4b8`, max 240; e4m3fn on gfx950), int8 -> fp16 by integer ops (no
inline PTX), the launch configs of the target (decode attention's `AMD_DECODE_TILES`, the skinny GEMM's stages from
the target's LDS and its SiLU epilogue's 8 warps) from the functions the launches call, and every pointer with the
16-byte divisibility hint that every launch on torch's allocations gives. "as_launched" also specializes the
int8 decode attention kernel's integer arguments as a launch on the 8B shape does (compile_sm90.py's).

From each compiled kernel's amdgcn (LLVM's `.amdhsa_*` directives, its register comments and the HSA metadata):
arch VGPRs, AGPRs (CDNA's accumulation registers, which MFMA results may live in), SGPRs, the MFMA instructions,
scratch bytes per lane (private segment: > 0 means spilled registers or a stack), LDS bytes (Triton allocates it
dynamically: metadata.shared, plus any static group segment), and the occupancy in waves per SIMD, `occupancy()`.

`python tests/kernels/compile_gfx942.py --jobs 2` compiles in 2 processes; `--table` prints BENCHMARKS.md's table
instead of the JSON; `--dump DIR` writes each as-launched variant's TTGIR and amdgcn there.
"""

from __future__ import annotations

import json
import math
import multiprocessing
import os
import re
import sys
import time

import triton
from triton.backends.compiler import GPUTarget

from kernels.targets import AMD_LDS_PER_CU
from tests.kernels.compile_variants import decode_as_launched, source, variants

ARCHS = ("gfx942", "gfx950")
# CDNA3 (gfx942) and CDNA4 (gfx950), per SIMD and per CU (LLVM AMDGPUBaseInfo.cpp and AMDGPUUsage "Memory Spaces";
# AMD's CDNA3 ISA guide): a unified register file of 512 32-bit registers per lane per SIMD, which a wave's arch
# VGPRs and AGPRs share (the AGPRs start at `accum_offset`, the VGPR count rounded up to 4), allocated in granules of
# 8; at most 8 waves per SIMD (4 SIMDs a CU); LDS per CU 64 KiB on gfx942, 160 KiB on gfx950 (kernels/targets.py, which
# the launch configs size their stages by).
VGPRS_PER_SIMD_LANE = 512
VGPR_GRANULE = 8
MAX_WAVES_PER_SIMD = 8
SIMDS_PER_CU = 4
LDS_PER_CU = AMD_LDS_PER_CU


def align(x: int, to: int) -> int:
    return -(-x // to) * to


def occupancy(vgprs: int, agprs: int, lds: int, num_warps: int, lds_per_cu: int) -> dict:
    """Waves per SIMD a kernel can keep resident on CDNA3/4, from its registers and LDS.

    Registers: a wave holds align(align(vgprs, 4) + agprs, 8) of the SIMD's 512 per lane (just vgprs without AGPRs),
    so 512 // that waves fit, at most 8 (LLVM's getNumWavesPerEUWithNumVGPRs; its "; Occupancy:" comment in the
    amdgcn agrees, but it counts no LDS: Triton's is dynamic). A workgroup of num_warps waves spreads over the CU's 4
    SIMDs and is resident whole: per SIMD ceil(num_warps / 4) of its waves, and the CU's LDS holds
    lds_per_cu // lds workgroups. waves_per_simd is the smaller bound, in whole workgroups."""
    total = align(align(vgprs, 4) + agprs, VGPR_GRANULE) if agprs else align(max(vgprs, 1), VGPR_GRANULE)
    by_vgprs = min(MAX_WAVES_PER_SIMD, VGPRS_PER_SIMD_LANE // total)
    per_simd = math.ceil(num_warps / SIMDS_PER_CU)
    groups = by_vgprs // per_simd
    if lds:
        groups = min(groups, lds_per_cu // lds)
    return {"waves_by_vgprs": by_vgprs, "waves_per_simd": min(MAX_WAVES_PER_SIMD, groups * per_simd)}


def _int(pattern: str, text: str, default: int | None = None) -> int:
    match = re.search(pattern, text, re.MULTILINE)
    if match is None:
        if default is None:
            raise ValueError(f"no {pattern!r} in the amdgcn")
        return default
    return int(match.group(1))


def facts(kernel, arch: str) -> dict:
    """What decides a compiled kernel's speed on CDNA, from its amdgcn and metadata."""
    asm = kernel.asm["amdgcn"]
    vgprs = _int(r"^; NumVgprs: (\d+)", asm)
    agprs = _int(r"^; NumAgprs: (\d+)", asm, 0)
    lds = kernel.metadata.shared + _int(r"\.amdhsa_group_segment_fixed_size (\d+)", asm)
    num_warps = kernel.metadata.num_warps
    return {
        "vgprs": vgprs,
        "agprs": agprs,
        "sgprs": _int(r"^; TotalNumSgprs: (\d+)", asm),
        "scratch_bytes": _int(r"\.amdhsa_private_segment_fixed_size (\d+)", asm),
        "vgpr_spills": _int(r"\.vgpr_spill_count:\s+(\d+)", asm, 0),
        "sgpr_spills": _int(r"\.sgpr_spill_count:\s+(\d+)", asm, 0),
        "lds_bytes": lds,
        "num_warps": num_warps,
        "llvm_occupancy": _int(r"^; Occupancy: (\d+)", asm, 0),
        # the matrix-core (MFMA) instructions a tl.dot became, if any (prefill attention's two dots)
        "mfma": sorted(set(re.findall(r"^\s*(v_mfma_\w+)", asm, re.MULTILINE))),
        **occupancy(vgprs, agprs, lds, num_warps, LDS_PER_CU[arch]),
    }


def _compile(job: tuple[str, str, int]) -> tuple[str, dict, dict[str, str]]:
    """(name, facts or {"error": ...}, asm to dump) of variant `index` of `kind` ("variants" / "as_launched")."""
    arch, kind, index = job
    target = GPUTarget("hip", arch, 64)
    if kind == "variants":
        variant, values = variants(target)[index], None
    else:
        variant, values = decode_as_launched(target)[index]
    t = time.time()
    try:
        src = source(variant.fn, variant.pointers, variant.constants, values, aligned=True)
        kernel = triton.compile(src, target=target, options=variant.options)
        result = facts(kernel, arch) | {"seconds": round(time.time() - t, 1)}
    except Exception as exc:
        return variant.name, {"error": f"{type(exc).__name__}: {str(exc)[-400:]}"}, {}
    asm = {"ttgir": kernel.asm["ttgir"], "amdgcn": kernel.asm["amdgcn"]} if kind == "as_launched" else {}
    return variant.name, result, asm


def known(arch: str) -> str | None:
    """None if the installed Triton compiles for arch, else why not."""
    try:
        variant = variants(GPUTarget("hip", arch, 64))[-1]  # to_dot, the smallest kernel
        triton.compile(source(variant.fn, variant.pointers, variant.constants), target=GPUTarget("hip", arch, 64))
    except Exception as exc:
        return f"Triton {triton.__version__} does not compile for {arch}: {type(exc).__name__}: {str(exc)[-200:]}"
    return None


def run(archs=ARCHS, jobs: int = 1, dump: str | None = None) -> dict:
    report = {}
    for arch in archs:
        why = known(arch)
        if why:
            report[arch] = {"unknown": why}
            continue
        target = GPUTarget("hip", arch, 64)
        work = [(arch, "variants", i) for i in range(len(variants(target)))]
        work += [(arch, "as_launched", i) for i in range(len(decode_as_launched(target)))]
        if jobs > 1:
            with multiprocessing.get_context("fork").Pool(jobs) as pool:
                done = pool.map(_compile, work, chunksize=1)
        else:
            done = [_compile(job) for job in work]
        report[arch] = {"variants": {}, "as_launched": {}}
        for (_, kind, _), (name, result, asm) in zip(work, done, strict=True):
            report[arch][kind][name] = result
            if dump and asm:
                os.makedirs(dump, exist_ok=True)
                stem = os.path.join(dump, f"{arch}_" + name.replace(" ", "_").replace("=", ""))
                for ext, text in asm.items():
                    with open(f"{stem}.{ext}", "w") as f:
                        f.write(text)
    return {"targets": report, "triton": triton.__version__, "limits": {"lds_per_cu": LDS_PER_CU,
            "vgprs_per_simd_lane": VGPRS_PER_SIMD_LANE, "max_waves_per_simd": MAX_WAVES_PER_SIMD}}  # fmt: skip


def table(report: dict, arch: str = "gfx942") -> str:
    """BENCHMARKS.md's table of one target: a row per variant, as-launched rows last."""
    rows = ["| kernel | variant | VGPR | AGPR | SGPR | scratch (spills) | LDS bytes | waves/SIMD |",
            "|---|---|---|---|---|---|---|---|"]  # fmt: skip
    target = report["targets"][arch]
    for kind in ("variants", "as_launched"):
        for name, f in target[kind].items():
            kernel, _, variant = name.partition(" ")
            variant += " (as launched, 8B shape)" if kind == "as_launched" else ""
            if "error" in f:
                rows.append(f"| {kernel} | {variant} | failed: {f['error'][:120]} | | | | | |")
                continue
            spills = f"{f['scratch_bytes']} ({f['vgpr_spills']} VGPR, {f['sgpr_spills']} SGPR)"
            rows.append(f"| {kernel} | {variant} | {f['vgprs']} | {f['agprs']} | {f['sgprs']} | {spills} | "
                        f"{f['lds_bytes']} | {f['waves_per_simd']} |")  # fmt: skip
    return "\n".join(rows)


if __name__ == "__main__":
    jobs = int(sys.argv[sys.argv.index("--jobs") + 1]) if "--jobs" in sys.argv else 1
    dump = sys.argv[sys.argv.index("--dump") + 1] if "--dump" in sys.argv else None
    result = run(jobs=jobs, dump=dump)
    print(table(result) if "--table" in sys.argv else json.dumps(result))

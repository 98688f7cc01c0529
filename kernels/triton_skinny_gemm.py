"""Skinny GEMM, Triton: y = x W^T for the few rows of a decode batch (2..128), optionally with the MLP's activation
as the epilogue. The reference is `skinny_gemm_ref` (kernels/skinny_gemm.py): torch's linear, and
kernels/activation.py's silu_and_mul_ref after it.

Why not cuBLAS there: on an H200 at batch 64 (bench/results/profile_decode_bs64_ctx1024.txt) cuBLAS's qkv, o and
down kernels read their weights at 0.71, 0.68 and 0.78 of the copy bandwidth, and they do not take part in
programmatic dependent launch (kernels/pdl.py): the step spent ~330 us in launch gaps, most of them beside cuBLAS
kernels. Here every program waits on the device for the previous kernel and lets the next one launch after its main
loop, as the batch-1 GEMV does, and gate_up can write silu(gate) * up directly (no activation kernel).

Measured (H200, bench/model_bench.py --sweep kernels.ops.SKINNY_GEMM=1,0): batch-64 decode 0.766 of the floor against
0.734 with cuBLAS, the step's launch gaps from ~330 us to ~60 us; batch 16 0.738 against 0.701. At 128 rows it is
slower (0.630 against 0.696: the tiles tuned for 64 rows lose their stages to shared memory), so kernels/ops.py sends
at most 64 rows here. An untuned first version (32 columns, 4 stages everywhere) lost at every batch: the tiles matter.

Tried and dropped (H200, batch-64 decode, 8B shape, one process, on / off alternating): the batch-1 GEMV's way of
dropping the norm kernels (kernels/triton_gemv.py ADD_RES_SUMSQ / NORM_SUMSQ) here, o_proj and down_proj adding the
residual and leaving per-row partial sums of squares, the next projection feeding the dot norm_weight * x and
scaling rows by 1/rms after its loop: 0.671 / 0.670 of the floor against 0.740 / 0.735 without (6.81 against
6.18 ms a step). Scaling the x tile on every K step costs far more than the 64 norm kernels it saves (commit 86c66e7
has the code).

One program owns BLOCK_N output columns (with SILU_MUL_OUT, the same columns of the gate and the up half) and streams
their weight rows once, in [BLOCK_K, BLOCK_N] tiles, against all the batch's rows of x: a [BLOCK_M, BLOCK_N] tl.dot
per tile, float32 accumulation.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from triton.backends.compiler import GPUTarget

from kernels import pdl, targets

# Rows of x this kernel takes; more go to cuBLAS (a real GEMM is compute-bound there, not bandwidth-bound).
MAX_ROWS = 128
# What the kernel writes: y itself, or silu(gate) * up of y = [gate, up] (weight [2N, K]).
OUT, SILU_MUL_OUT = 0, 1
# Bytes of shared memory the pipeline stages may take: per target, kernels/targets.py `shared_memory_budget` (an
# H100/H200 SM has 227 KB for one program: 200 KB; an AMD CU's LDS shared by 2 workgroups: 32 KiB on gfx942, 80 KiB on
# gfx950, whose asynchronous copies buffer every stage in LDS).
# SILU_MUL_OUT holds the gate's and the up's accumulators: on AMD with 4 waves a program that is 225-237 VGPRs + 32
# AGPRs at 32-column tiles (gfx942), 1 wave/SIMD; with 8 waves 188 + 0, 2 waves/SIMD (compiled, not measured:
# tests/kernels/compile_gfx942.py).
AMD_SILU_NUM_WARPS = 8
# Each program reads its first [BLOCK_K, BLOCK_N] weight tile (and up tile) into registers before its PDL wait, the
# weight being a constant, and takes it into the first dot after the wait; the pipelined loop starts at the second
# tile. The batch-1 GEMV gains ~0.5% of a step so (kernels/triton_gemv.py PRELOAD); here it made no difference
# (H200, batch-64 decode, one process, with down_proj split or not: 5.999 / 6.003 ms on against 6.002 / 5.996 off;
# bench/results/tune_settings_2026-12-04h.json): off. Read at each call
# (`model_bench --sweep kernels.triton_skinny_gemm.PRELOAD=1,0 --batches 64`).
PRELOAD = False
# The next kernel may launch right after this one's PDL wait instead of after its loop (kernels/triton_gemv.py
# TRIGGER_AFTER_WAIT says why). H200, 8B shape, int8 KV, 1k context, one process (bench/results/
# tune_settings_2026-12-04o.json): on / off, batch 8 4.771 and 4.776 / 4.840 and 4.840 ms a step, batch 64 6.026 and
# 6.049 / 6.108 and 6.122; on with PRELOAD as well: 4.858 / 6.095 and 4.859 / 6.084, so PRELOAD stays off. Read at
# each call (`model_bench --sweep kernels.triton_skinny_gemm.TRIGGER_AFTER_WAIT=1,0 --batches 64`).
TRIGGER_AFTER_WAIT = True


@triton.jit
def _skinny_kernel(
    x_ptr,  # [M, K]
    w_ptr,  # [N, K] (SILU_MUL_OUT: [2N, K], gate rows then up rows)
    y_ptr,  # [M, N]; with splits, [splits, M, N] float32 partial sums
    M,
    N,
    K,  # the K of one split (the grid's second axis: split s reads columns [s * K, (s + 1) * K) of x)
    stride_xm,
    stride_wn,
    stride_ym,
    stride_ys,  # the distance between two splits' partials (0 with one split)
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    EPILOGUE: tl.constexpr,
    PRELOAD: tl.constexpr,
    TRIGGER_AFTER_WAIT: tl.constexpr,
    PDL: tl.constexpr,
):
    pid = tl.program_id(0)
    k_start = tl.program_id(1) * K  # the split's first column of x (0 with one split)
    offs_m = tl.arange(0, BLOCK_M)
    offs_n = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    mask_m = offs_m < M
    mask_n = offs_n < N
    x_ptrs = x_ptr + offs_m[:, None] * stride_xm + (k_start + offs_k)[None, :]  # [BLOCK_M, BLOCK_K]
    # [BLOCK_K, BLOCK_N]; row offsets in int64: an lm_head's N * K exceeds 2^31
    w_ptrs = w_ptr + offs_n[None, :].to(tl.int64) * stride_wn + (k_start + offs_k)[:, None]
    up_ptrs = w_ptrs + N * stride_wn  # SILU_MUL_OUT: the same columns of the up half
    if PRELOAD:
        # the weight is a constant: its first tile may be read before the wait (`PRELOAD`)
        w_first = tl.load(w_ptrs, mask=mask_n[None, :], other=0.0)
        if EPILOGUE == 1:
            w_up_first = tl.load(up_ptrs, mask=mask_n[None, :], other=0.0)
    pdl.wait(PDL)  # nothing else is read before the previous kernel is done
    if TRIGGER_AFTER_WAIT:
        pdl.trigger(PDL)
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    acc_up = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    k_begin = 0
    if PRELOAD:
        x = tl.load(x_ptrs, mask=mask_m[:, None], other=0.0)
        acc = tl.dot(x, w_first, acc)
        if EPILOGUE == 1:
            acc_up = tl.dot(x, w_up_first, acc_up)
        k_begin = BLOCK_K
    for k0 in range(k_begin, K, BLOCK_K):  # K is a multiple of BLOCK_K (`skinny_config`)
        x = tl.load(x_ptrs + k0, mask=mask_m[:, None], other=0.0)
        acc = tl.dot(x, tl.load(w_ptrs + k0, mask=mask_n[None, :], other=0.0), acc)
        if EPILOGUE == 1:
            acc_up = tl.dot(x, tl.load(up_ptrs + k0, mask=mask_n[None, :], other=0.0), acc_up)
    if not TRIGGER_AFTER_WAIT:
        pdl.trigger(PDL)
    y = acc
    if EPILOGUE == 1:
        # rounded where the unfused kernels round: gate and up as a GEMM stores them, then kernels/activation.py
        gate = acc.to(y_ptr.dtype.element_ty).to(tl.float32)
        up = acc_up.to(y_ptr.dtype.element_ty).to(tl.float32)
        y = gate / (1.0 + tl.exp(-gate)) * up
    y_ptrs = y_ptr + tl.program_id(1) * stride_ys + offs_m[:, None] * stride_ym + offs_n[None, :]
    tl.store(y_ptrs, y.to(y_ptr.dtype.element_ty), mask=mask_m[:, None] & mask_n[None, :])


def _stage_bytes(m: int, weight_columns: int, block_k: int) -> int:
    """Shared memory of one pipeline stage: the [m, block_k] x tile and the [block_k, weight_columns] weight tile."""
    return (max(16, triton.next_power_of_2(m)) + weight_columns) * block_k * 2


def skinny_config(n: int, k: int, m: int = 64, splits: int = 1,
                  target: GPUTarget | None = None) -> tuple[int, int, int, int] | None:  # fmt: skip
    """(BLOCK_N, BLOCK_K, num_warps, num_stages) for an [n, k] weight (n output columns) and m rows, or None (use
    cuBLAS). splits > 1: K cut in that many shares (`skinny_gemm`). target: where it runs (kernels/targets.py; None on
    the CPU), for the shared memory the stages may take.

    bench/tune_skinny_gemm.py at 64 rows on an H200 (us, fraction of the copy-bandwidth floor; cuBLAS in brackets):
    qkv 64 columns x 128, 6 stages: 15.6 (15.7); o 32 x 128, 6 stages: 11.7 (12.0); gate_up 128 x 64, 3 stages: 59.2
    (61.0); down 32 x 128, 6 stages: 33.0 (35.0). Deep pipelines, not split-K (which never won): a memory-bound tile
    wants many bytes in flight. Stages are cut to what fits shared memory at m rows. In 2 splits, without the sum
    (`tune_skinny_gemm.py --no-sum`), down was fastest in 64-column tiles: 31.4 us.
    """
    if k >= 8192:
        block_n, block_k, stages = (64 if splits > 1 else 32), 128, 6
    elif n >= 16384:
        block_n, block_k, stages = 128, 64, 3
    elif n > 4096:
        block_n, block_k, stages = 64, 128, 6
    else:
        block_n, block_k, stages = 32, 128, 6
    while k % block_k:
        block_k //= 2
        if block_k < 64:
            return None
    stages = max(2, min(stages, targets.shared_memory_budget(target) // _stage_bytes(m, block_n, block_k)))
    return block_n, block_k, 4, stages


def skinny_launch(n: int, k: int, m: int, splits: int = 1, epilogue: int = OUT, preload: bool = False,
                  target: GPUTarget | None = None,
                  tuning: dict | None = None) -> tuple[int, int, int, int] | None:  # fmt: skip
    """(BLOCK_N, BLOCK_K, num_warps, num_stages) of a launch on target (None: the CPU) for an [n, k] weight (the whole
    [2N, K] one for SILU_MUL_OUT), m rows, with `tuning`'s overrides; None where `skinny_config` has none. The one
    place the launch decides them, called by `skinny_gemm` and by the compile checks
    (tests/kernels/compile_variants.py)."""
    # of the whole weight: SILU_MUL_OUT reads BLOCK_N // 2 rows of each half
    config = skinny_config(n, k, m, splits, target)
    if config is None:
        return None
    if epilogue == SILU_MUL_OUT:
        warps = AMD_SILU_NUM_WARPS if targets.is_amd(target) else config[2]
        config = (max(16, config[0] // 2), config[1], warps, config[3])
    tuning = tuning or {}
    names = ("block_n", "block_k", "num_warps", "num_stages")
    block_n, block_k, num_warps, num_stages = (tuning.get(key, v) for key, v in zip(names, config, strict=True))
    if preload and "num_stages" not in tuning:
        # the preloaded tile takes shared memory too: one stage fewer where the budget is full (qkv: 6 -> 5)
        weight_columns = 2 * block_n if epilogue == SILU_MUL_OUT else block_n
        budget = targets.shared_memory_budget(target)
        num_stages = max(2, min(num_stages, budget // _stage_bytes(m, weight_columns, block_k) - 1))
    return block_n, block_k, num_warps, num_stages


def skinny_gemm(
    x: torch.Tensor,
    weight: torch.Tensor,
    epilogue: int = OUT,
    tuning: dict | None = None,
    preload: bool | None = None,
    splits: int = 1,
):
    """y = x weight^T [M, N] in x's dtype (SILU_MUL_OUT: weight [2N, K] = cat(gate, up), y = silu(gate) * up
    [M, N]); None when the shape has no config or the layout does not fit (the caller falls back to torch).

    x: [M, K] with 1 <= M <= MAX_ROWS and unit stride along K; weight [N, K] of x's dtype, unit stride along K.
    tuning: launch overrides (block_n, block_k, num_warps, num_stages). preload: the first weight tile read before
    the PDL wait (default `PRELOAD`). splits > 1 (OUT only): K cut in that many equal parts, one program per part
    and column tile, and the float32 partial sums returned unsummed, [splits, M, N], for a consumer that adds them
    (kernels/triton_norm.py fused_add_rms_norm_parts); None where K / splits has no whole number of K tiles.
    """
    m, k = x.shape
    n = weight.shape[0]
    if not 1 <= m <= MAX_ROWS or weight.shape[1] != k or x.stride(1) != 1 or weight.stride(1) != 1:
        return None
    if epilogue == SILU_MUL_OUT and n % 2:
        return None
    preload = bool(PRELOAD if preload is None else preload)
    config = skinny_launch(n, k, m, splits, epilogue, preload, targets.device_target(x.device), tuning)
    if config is None:
        return None
    block_n, block_k, num_warps, num_stages = config
    if epilogue == SILU_MUL_OUT:
        n //= 2
    if splits > 1:
        if epilogue != OUT or k % (splits * block_k):
            return None
        y = torch.empty(splits, m, n, dtype=torch.float32, device=x.device)
    else:
        y = torch.empty(m, n, dtype=x.dtype, device=x.device)
    _skinny_kernel[(triton.cdiv(n, block_n), splits)](
        x,
        weight,
        y,
        m,
        n,
        k // splits,
        x.stride(0),
        weight.stride(0),
        y.stride(-2),
        y.stride(0) if splits > 1 else 0,
        BLOCK_M=max(16, triton.next_power_of_2(m)),
        BLOCK_N=block_n,
        BLOCK_K=block_k,
        EPILOGUE=epilogue,
        PRELOAD=preload,
        TRIGGER_AFTER_WAIT=bool(TRIGGER_AFTER_WAIT),
        num_warps=num_warps,
        num_stages=num_stages,
        **pdl.launch_options(x.device),
    )
    return y

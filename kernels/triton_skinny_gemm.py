"""Skinny GEMM, Triton: y = x W^T for the few rows of a decode batch (2..128), optionally with the MLP's activation
as the epilogue. The reference is torch's linear (and kernels/activation.py's silu_and_mul_ref after it).

Why not cuBLAS there: on an H200 at batch 64 (bench/results/profile_decode_bs64_ctx1024.txt) cuBLAS's qkv, o and
down kernels read their weights at 0.71, 0.68 and 0.78 of the copy bandwidth, and they do not take part in
programmatic dependent launch (kernels/pdl.py): the step spent ~330 us in launch gaps, most of them beside cuBLAS
kernels. Here every program waits on the device for the previous kernel and lets the next one launch after its main
loop, as the batch-1 GEMV does, and gate_up can write silu(gate) * up directly (no activation kernel).

Measured (H200, bench/model_bench.py --sweep kernels.ops.SKINNY_GEMM=1,0): batch-64 decode 0.766 of the floor against
0.734 with cuBLAS, the step's launch gaps from ~330 us to ~60 us; batch 16 0.738 against 0.701. At 128 rows it is
slower (0.630 against 0.696: the tiles tuned for 64 rows lose their stages to shared memory), so kernels/ops.py sends
at most 64 rows here. An untuned first version (32 columns, 4 stages everywhere) lost at every batch: the tiles matter.

One program owns BLOCK_N output columns (with SILU_MUL_OUT, the same columns of the gate and the up half) and streams
their weight rows once, in [BLOCK_K, BLOCK_N] tiles, against all the batch's rows of x: a [BLOCK_M, BLOCK_N] tl.dot
per tile, float32 accumulation.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kernels import pdl

# Rows of x this kernel takes; more go to cuBLAS (a real GEMM is compute-bound there, not bandwidth-bound).
MAX_ROWS = 128
# What the kernel writes: y itself, or silu(gate) * up of y = [gate, up] (weight [2N, K]), or (ADD_RES_SUMSQ) y plus
# the residual, with each program's partial sums of squares of its columns per row ([programs, BLOCK_M] float32),
# as kernels/triton_gemv.py does at batch 1: the next projection normalizes with them (NORM_SUMSQ), and the layer's
# norm kernels go.
OUT, SILU_MUL_OUT, ADD_RES_SUMSQ = 0, 1, 2
# What it computes its input rows from: x itself, or RMSNorm(x) * norm_weight with x's sums of squares given as the
# producer's partial sums. The loop feeds the dot norm_weight * x (rounded to x's dtype: a tl.dot takes 16-bit
# inputs) and multiplies each row's dot products by its 1/rms after the weight stream. The unfused norm rounds x/rms
# and then its product with the weight; here x * weight is rounded once and the 1/rms factor stays float32.
PLAIN, NORM_SUMSQ = 0, 1
# Partial sums read per step at the end (rows of the [programs, BLOCK_M] tile): bounds the registers it takes.
SUMSQ_CHUNK = tl.constexpr(32)
# Bytes of shared memory the pipeline stages may take (an H100/H200 SM has 227 KB for one program).
SHARED_MEMORY_BUDGET = 200 * 1024


@triton.jit
def _skinny_kernel(
    x_ptr,  # [M, K]
    w_ptr,  # [N, K] (SILU_MUL_OUT: [2N, K], gate rows then up rows)
    y_ptr,  # [M, N]
    res_ptr,  # ADD_RES_SUMSQ: [M, N] residual
    nw_ptr,  # NORM_SUMSQ: [K] norm weight
    sumsq_ptr,  # ADD_RES_SUMSQ: written, NORM_SUMSQ: read; [programs, stride_s] float32
    sumsq_count,  # NORM_SUMSQ: the producer's programs
    M,
    N,
    K,
    stride_xm,
    stride_wn,
    stride_ym,
    stride_rm,
    stride_s,
    eps,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    PROLOGUE: tl.constexpr,
    EPILOGUE: tl.constexpr,
    PDL: tl.constexpr,
):
    pdl.wait(PDL)  # nothing is read before the previous kernel is done
    pid = tl.program_id(0)
    offs_m = tl.arange(0, BLOCK_M)
    offs_n = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    mask_m = offs_m < M
    mask_n = offs_n < N
    x_ptrs = x_ptr + offs_m[:, None] * stride_xm + offs_k[None, :]  # [BLOCK_M, BLOCK_K]
    # [BLOCK_K, BLOCK_N]; row offsets in int64: an lm_head's N * K exceeds 2^31
    w_ptrs = w_ptr + offs_n[None, :].to(tl.int64) * stride_wn + offs_k[:, None]
    up_ptrs = w_ptrs + N * stride_wn  # SILU_MUL_OUT: the same columns of the up half
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    acc_up = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):  # K is a multiple of BLOCK_K (`skinny_config`)
        x = tl.load(x_ptrs + k0, mask=mask_m[:, None], other=0.0)
        if PROLOGUE == 1:
            nw = tl.load(nw_ptr + k0 + offs_k).to(tl.float32)
            x = (x.to(tl.float32) * nw[None, :]).to(x_ptr.dtype.element_ty)
        acc = tl.dot(x, tl.load(w_ptrs + k0, mask=mask_n[None, :], other=0.0), acc)
        if EPILOGUE == 1:
            acc_up = tl.dot(x, tl.load(up_ptrs + k0, mask=mask_n[None, :], other=0.0), acc_up)
    pdl.trigger(PDL)  # after the loop: a multi-wave grid keeps its SMs until then
    if PROLOGUE == 1:
        # each row's 1/rms from the producer's partial sums, read after the weight stream (off its critical path)
        squares = tl.zeros([BLOCK_M], dtype=tl.float32)
        for s0 in range(0, sumsq_count, SUMSQ_CHUNK):
            offs_s = s0 + tl.arange(0, SUMSQ_CHUNK)
            part = tl.load(sumsq_ptr + offs_s[:, None] * stride_s + offs_m[None, :],
                           mask=(offs_s < sumsq_count)[:, None] & mask_m[None, :], other=0.0)  # fmt: skip
            squares += tl.sum(part, axis=0)
        # correctly rounded, as kernels/triton_norm.py
        inv_rms = tl.math.div_rn(1.0, tl.math.sqrt_rn(tl.math.div_rn(squares, K.to(tl.float32)) + eps))
        acc = acc * inv_rms[:, None]
        acc_up = acc_up * inv_rms[:, None]
    y = acc
    if EPILOGUE == 1:
        # rounded where the unfused kernels round: gate and up as a GEMM stores them, then kernels/activation.py
        gate = acc.to(y_ptr.dtype.element_ty).to(tl.float32)
        up = acc_up.to(y_ptr.dtype.element_ty).to(tl.float32)
        y = gate / (1.0 + tl.exp(-gate)) * up
    mask = mask_m[:, None] & mask_n[None, :]
    if EPILOGUE == 2:
        # y rounded as stored, plus the residual in float32, rounded: kernels/norm.py's fused_add_rms_norm_ref
        res = tl.load(res_ptr + offs_m[:, None] * stride_rm + offs_n[None, :], mask=mask, other=0.0)
        y = (y.to(y_ptr.dtype.element_ty).to(tl.float32) + res.to(tl.float32)).to(y_ptr.dtype.element_ty)
        y32 = tl.where(mask, y.to(tl.float32), 0.0)
        tl.store(sumsq_ptr + pid * stride_s + offs_m, tl.sum(y32 * y32, axis=1))
    y_ptrs = y_ptr + offs_m[:, None] * stride_ym + offs_n[None, :]
    tl.store(y_ptrs, y.to(y_ptr.dtype.element_ty), mask=mask)


def skinny_config(n: int, k: int, m: int = 64) -> tuple[int, int, int, int] | None:
    """(BLOCK_N, BLOCK_K, num_warps, num_stages) for an [n, k] weight (n output columns) and m rows, or None (use
    cuBLAS).

    bench/tune_skinny_gemm.py at 64 rows on an H200 (us, fraction of the copy-bandwidth floor; cuBLAS in brackets):
    qkv 64 columns x 128, 6 stages: 15.6 (15.7); o 32 x 128, 6 stages: 11.7 (12.0); gate_up 128 x 64, 3 stages: 59.2
    (61.0); down 32 x 128, 6 stages: 33.0 (35.0). Deep pipelines, not split-K (which never won): a memory-bound tile
    wants many bytes in flight. Stages are cut to what fits shared memory at m rows.
    """
    if k >= 8192:
        block_n, block_k, stages = 32, 128, 6
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
    per_stage = (max(16, triton.next_power_of_2(m)) + block_n) * block_k * 2  # bytes of x and weight tiles
    stages = max(2, min(stages, SHARED_MEMORY_BUDGET // per_stage))
    return block_n, block_k, 4, stages


def skinny_gemm(
    x: torch.Tensor,
    weight: torch.Tensor,
    epilogue: int = OUT,
    tuning: dict | None = None,
    prologue: int = PLAIN,
    residual: torch.Tensor | None = None,
    norm_weight: torch.Tensor | None = None,
    eps: float = 0.0,
    sumsq: torch.Tensor | None = None,
):
    """y = x weight^T [M, N] in x's dtype (SILU_MUL_OUT: weight [2N, K] = cat(gate, up), y = silu(gate) * up
    [M, N]); None when the shape has no config or the layout does not fit (the caller falls back to torch).

    x: [M, K] with 1 <= M <= MAX_ROWS and unit stride along K; weight [N, K] of x's dtype, unit stride along K.
    tuning: launch overrides (block_n, block_k, num_warps, num_stages).
    ADD_RES_SUMSQ: returns (y + residual, partial sums of squares [programs, rows padded] float32) instead of y.
    NORM_SUMSQ: x is normalized (rms_norm(x) * norm_weight, eps) with the sums of squares of such a result (`sumsq`).
    """
    m, k = x.shape
    n = weight.shape[0]
    if not 1 <= m <= MAX_ROWS or weight.shape[1] != k or x.stride(1) != 1 or weight.stride(1) != 1:
        return None
    if (prologue == NORM_SUMSQ) != (sumsq is not None) or (epilogue == ADD_RES_SUMSQ) != (residual is not None):
        raise ValueError("NORM_SUMSQ takes sumsq, ADD_RES_SUMSQ a residual (and nothing else does)")
    if prologue == NORM_SUMSQ and epilogue == ADD_RES_SUMSQ:
        raise ValueError("NORM_SUMSQ and ADD_RES_SUMSQ share the sumsq argument: one of them per call")
    if residual is not None and (residual.shape != (m, n) or residual.stride(1) != 1):
        return None
    config = skinny_config(n, k, m)  # of the whole weight: SILU_MUL_OUT reads BLOCK_N // 2 rows of each half
    if config is None:
        return None
    if epilogue == SILU_MUL_OUT:
        if n % 2:
            return None
        n //= 2
        config = (max(16, config[0] // 2), *config[1:])
    tuning = tuning or {}
    names = ("block_n", "block_k", "num_warps", "num_stages")
    block_n, block_k, num_warps, num_stages = (tuning.get(key, v) for key, v in zip(names, config, strict=True))
    y = torch.empty(m, n, dtype=x.dtype, device=x.device)
    programs = triton.cdiv(n, block_n)
    block_m = max(16, triton.next_power_of_2(m))
    if epilogue == ADD_RES_SUMSQ:
        sumsq = torch.empty(programs, block_m, dtype=torch.float32, device=x.device)
    _skinny_kernel[(programs,)](
        x,
        weight,
        y,
        residual if residual is not None else y,
        norm_weight if norm_weight is not None else x,
        sumsq if sumsq is not None else y,
        sumsq.shape[0] if sumsq is not None else 0,
        m,
        n,
        k,
        x.stride(0),
        weight.stride(0),
        y.stride(0),
        residual.stride(0) if residual is not None else 0,
        sumsq.stride(0) if sumsq is not None else 0,
        eps,
        BLOCK_M=block_m,
        BLOCK_N=block_n,
        BLOCK_K=block_k,
        PROLOGUE=prologue,
        EPILOGUE=epilogue,
        num_warps=num_warps,
        num_stages=num_stages,
        **pdl.launch_options(x.device),
    )
    return (y, sumsq) if epilogue == ADD_RES_SUMSQ else y

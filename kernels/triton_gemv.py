"""Batch-1 linear layer, Triton: y = x W^T (+ b) for one row x, the GEMV of every batch-1 decode step.

Same function as `gemv_ref` (kernels/gemv.py: torch's linear in float32). At batch 1 a projection streams its weight
once and does two FLOPs a weight: the only thing that matters is how close the weight read gets to the memory bandwidth.
cuBLAS's batch-1 kernels leave some on the table on the Llama-3-8B shapes; this plain kernel (each program a few whole
rows, a [BLOCK_N, BLOCK_K] float32 accumulator summed once at the end) reads them faster. H200, weights too big for L2
(bench/tune_gemv.py), fraction of the copy-bandwidth floor, cuBLAS -> this kernel: qkv 0.76 -> 0.87, o 0.65 -> 0.75,
gate_up 1.02 -> 1.05, down 0.93 -> 0.98, lm_head 1.07 -> 1.10 (above 1: a read-only stream beats a copy's rate).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kernels import pdl

# Tried and dropped, each measured on an H200 (batch-1 decode of the 8B shape at 1k context, fraction of the floor):
# - asking L2 for the first columns of every row before the PDL wait (prefetch.global.L2), to use the memory bus
#   during the small kernels: 0.847 without, 0.841 / 0.827 / 0.806 / 0.793 with 8 / 16 / 32 / 48 MB;
# - asking L2 for o_proj's whole weight (33.5 MB) from the decode attention kernel's programs, while the bus idles
#   during attention and the split reduce (prefetch.global.L2, a share per program, after or before its loop):
#   0.871 / 0.866 against 0.881 without, twice each in one process (2026-12-04, tune_settings_2026-12-04c.json);
# - a rewrite of this kernel with a silu(gate) * up epilogue (gate_up and its activation in one kernel), the first
#   weight chunk loaded before the PDL wait, and each input chunk read before its weight chunk: 0.772 / 0.789
#   against 0.838 for this kernel, same model otherwise, one machine, one sequence of runs.
# What the kernel computes its input row from (PROLOGUE): the row itself; silu(gate) * up of a gate_up row (the MLP's
# activation, fused into the down projection); RMSNorm of the row, or of row + residual (the layer norms, fused into
# the projection after them). Fused, a batch-1 decode layer is 5 kernels fewer (H200, bench/profile_decode.py: the
# norm and activation kernels took 180 us of a 4.3 ms step).
PLAIN, SILU_MUL, NORM, ADD_NORM = 0, 1, 2, 3
# NORM_SUMSQ: RMSNorm of a row whose sum of squares is already known, as partial sums written by the projection that
# produced the row (ADD_RES_SUMSQ below). Nothing is computed before the weight stream: the loop reads norm_weight * x,
# and 1 / rms multiplies the dot products at the end (a scalar factor commutes with the dot). The roundings differ from
# the unfused norm's (it rounds x / rms, then the product with the weight, to x's dtype; here both stay float32).
NORM_SUMSQ = 4
# What the kernel writes (EPILOGUE): y itself, or silu(gate) * up of y = [gate, up] (the MLP's activation after
# gate_up, so that the activation kernel goes): each program then reads BLOCK_N rows of each half.
OUT, SILU_MUL_OUT = 0, 1
# ADD_RES_SUMSQ: y + residual (the residual stream after o_proj or down_proj, rounded as kernels/norm.py's fused add
# rounds it), and per program the sum of the squares of its rows of that sum, for the next projection's NORM_SUMSQ.
# Between two projections of a batch-1 layer no norm kernel is left.
ADD_RES_SUMSQ = 2
# Each program loads its first weight chunk before its PDL wait (the weight is a constant), so that its first round
# trip to memory overlaps the end of the kernel before. H200, batch-1 decode of the 8B shape, on / off alternating in
# one process: 3.996 / 3.995 ms a step against 4.015 / 4.019 (the o_proj alone preloading: 4.012 / 4.008 against
# 4.015 / 4.023). Two chunks (the second held in registers too) measured slower: 4.139 / 4.133 against 3.947 / 3.933
# (bench/results/tune_settings_2026-12-04g.json, the setting then named PRELOAD_CHUNKS). An older variant of this
# kernel measured slower with one chunk (above); this one adds nothing else. With TRIGGER_AFTER_WAIT (below) the
# programs launch earlier and the preload is worth more: 3.929 / 4.032 and 3.926 / 4.037 ms (2026-12-04s.json). Read at
# each call (`model_bench --sweep kernels.triton_gemv.PRELOAD=1,0`).
PRELOAD = True
# Where a program lets the next kernel launch (kernels/pdl.py): after its main loop (False), or right after its own PDL
# wait (True), so that the next kernel's programs take the SMs this grid frees during its tail and read their first
# weight chunk then (PRELOAD) instead of after the last program's loop. No wave is starved: the next grid launches
# only once every program of this one has triggered, that is has started. H200, 8B shape, int8 KV, 1k context, one
# process, on / off alternating (bench/results/tune_settings_2026-12-04n.json): batch-1 decode 3.936 / 3.976, 3.922 /
# 3.977, 3.922 / 3.976 ms a step. Read at each call (`model_bench --sweep kernels.triton_gemv.TRIGGER_AFTER_WAIT=1,0
# --batches 1`).
TRIGGER_AFTER_WAIT = True


@triton.jit
def _input_chunk(x_ptr, res_ptr, nw_ptr, new_res_ptr, offs, K, inv_rms, WRITE_RES, PROLOGUE: tl.constexpr):
    """x's chunk `offs` as the GEMV consumes it (float32 holding values of x's dtype), rounded where the unfused
    kernels round (kernels/norm.py, kernels/activation.py)."""
    if PROLOGUE == 1:
        gate = tl.load(x_ptr + offs).to(tl.float32)
        up = tl.load(x_ptr + K + offs).to(tl.float32)
        x = (gate / (1.0 + tl.exp(-gate)) * up).to(x_ptr.dtype.element_ty).to(tl.float32)
    elif PROLOGUE == 4:
        x = tl.load(x_ptr + offs).to(tl.float32) * tl.load(nw_ptr + offs).to(tl.float32)
    elif PROLOGUE >= 2:
        x = tl.load(x_ptr + offs).to(tl.float32)
        if PROLOGUE == 3:
            x = (x + tl.load(res_ptr + offs).to(tl.float32)).to(x_ptr.dtype.element_ty)
            if WRITE_RES:
                tl.store(new_res_ptr + offs, x)
            x = x.to(tl.float32)
        normed = (x * inv_rms).to(x_ptr.dtype.element_ty).to(tl.float32)
        x = (tl.load(nw_ptr + offs).to(tl.float32) * normed).to(x_ptr.dtype.element_ty).to(tl.float32)
    else:
        x = tl.load(x_ptr + offs).to(tl.float32)
    return x


@triton.jit
def _gemv_kernel(x_ptr, w_ptr, b_ptr, y_ptr, res_ptr, nw_ptr, new_res_ptr, sumsq_ptr, sumsq_count, N, K, stride_wn,
                 eps, HAS_BIAS: tl.constexpr, PROLOGUE: tl.constexpr, EPILOGUE: tl.constexpr, BLOCK_N: tl.constexpr,
                 BLOCK_K: tl.constexpr, SUMSQ_PAD: tl.constexpr, PRELOAD: tl.constexpr,
                 TRIGGER_AFTER_WAIT: tl.constexpr, PDL: tl.constexpr):  # fmt: skip
    pid = tl.program_id(0)
    offs_n = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    mask_n = offs_n < N
    # Row offsets in int64 ([BLOCK_N] only): an lm_head's N * K exceeds 2^31.
    w_ptrs = w_ptr + offs_n[:, None].to(tl.int64) * stride_wn + offs_k[None, :]
    up_ptrs = w_ptrs + N * stride_wn  # SILU_MUL_OUT: the same rows of the up half (N = rows of each half)
    if PRELOAD:
        # the weight is a constant: its first chunk may be read before the wait (`PRELOAD`)
        w_first = tl.load(w_ptrs, mask=mask_n[:, None], other=0.0)
        if EPILOGUE == 1:
            w_up_first = tl.load(up_ptrs, mask=mask_n[:, None], other=0.0)
    pdl.wait(PDL)  # nothing else is read before the previous kernel is done (kernels/pdl.py)
    if TRIGGER_AFTER_WAIT:
        pdl.trigger(PDL)
    inv_rms = 0.0
    if PROLOGUE == 2 or PROLOGUE == 3:
        # Every program needs the norm of the whole row: a first pass over it (8 KB at hidden 4096, from L2).
        squares = tl.zeros([BLOCK_K], dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            x = tl.load(x_ptr + k0 + offs_k).to(tl.float32)
            if PROLOGUE == 3:
                x = (x + tl.load(res_ptr + k0 + offs_k).to(tl.float32)).to(x_ptr.dtype.element_ty).to(tl.float32)
            squares += x * x
        # correctly rounded, as kernels/triton_norm.py
        inv_rms = tl.math.div_rn(1.0, tl.math.sqrt_rn(tl.math.div_rn(tl.sum(squares, axis=0), K.to(tl.float32)) + eps))
    acc = tl.zeros([BLOCK_N, BLOCK_K], dtype=tl.float32)
    acc_up = tl.zeros([BLOCK_N, BLOCK_K], dtype=tl.float32)
    k_begin = 0
    if PRELOAD:
        x = _input_chunk(x_ptr, res_ptr, nw_ptr, new_res_ptr, offs_k, K, inv_rms, pid == 0, PROLOGUE)
        acc += w_first.to(tl.float32) * x[None, :]
        if EPILOGUE == 1:
            acc_up += w_up_first.to(tl.float32) * x[None, :]
        k_begin = BLOCK_K
    for k0 in range(k_begin, K, BLOCK_K):  # K is a multiple of BLOCK_K (`gemv_config`)
        w = tl.load(w_ptrs + k0, mask=mask_n[:, None], other=0.0)
        if EPILOGUE == 1:
            w_up = tl.load(up_ptrs + k0, mask=mask_n[:, None], other=0.0)
        x = _input_chunk(x_ptr, res_ptr, nw_ptr, new_res_ptr, k0 + offs_k, K, inv_rms, pid == 0, PROLOGUE)
        acc += w.to(tl.float32) * x[None, :]
        if EPILOGUE == 1:
            acc_up += w_up.to(tl.float32) * x[None, :]
    if not TRIGGER_AFTER_WAIT:
        pdl.trigger(PDL)
    y = tl.sum(acc, axis=1)
    y_up = tl.sum(acc_up, axis=1)
    if PROLOGUE == 4:
        # the producer's partial sums of squares, read after the weight stream (off its critical path)
        offs_s = tl.arange(0, SUMSQ_PAD)
        squares = tl.load(sumsq_ptr + offs_s, mask=offs_s < sumsq_count, other=0.0)
        inv_rms = tl.math.div_rn(1.0, tl.math.sqrt_rn(tl.math.div_rn(tl.sum(squares, axis=0), K.to(tl.float32)) + eps))
        y = y * inv_rms
        y_up = y_up * inv_rms
    if HAS_BIAS:
        y += tl.load(b_ptr + offs_n, mask=mask_n, other=0.0).to(tl.float32)
    if EPILOGUE == 1:
        # rounded where the unfused kernels round: gate and up as stored by the GEMV, then kernels/activation.py
        gate = y.to(y_ptr.dtype.element_ty).to(tl.float32)
        up = y_up.to(y_ptr.dtype.element_ty).to(tl.float32)
        y = gate / (1.0 + tl.exp(-gate)) * up
    if EPILOGUE == 2:
        # y rounded as stored, plus the residual in float32, rounded: kernels/norm.py's fused_add_rms_norm_ref
        y = y.to(y_ptr.dtype.element_ty).to(tl.float32)
        y = (y + tl.load(res_ptr + offs_n, mask=mask_n, other=0.0).to(tl.float32)).to(y_ptr.dtype.element_ty)
        y32 = tl.where(mask_n, y.to(tl.float32), 0.0)
        tl.store(sumsq_ptr + pid, tl.sum(y32 * y32, axis=0))
    tl.store(y_ptr + offs_n, y.to(y_ptr.dtype.element_ty), mask=mask_n)


def gemv_config(n: int, k: int) -> tuple[int, int, int] | None:
    """(BLOCK_N, BLOCK_K, num_warps) for an [n, k] weight, or None when K has no fitting tile (use cuBLAS).

    From bench/tune_gemv.py on an H200: wide outputs want short rows of tiles and many programs, long inputs (down
    projection) long tiles and 8 warps, the rest long tiles of 8 rows. Pipelining stages made no difference.
    """
    if n >= 16384:
        choice = (16, 256, 4)
    elif k >= 8192:
        choice = (16, 1024, 8)
    elif n <= 4096:
        choice = (8, 1024, 4)
    else:
        choice = (8, 512, 4)
    for block_k in (choice[1], 256, 128, 64):
        if k % block_k == 0:
            return choice[0], block_k, choice[2]
    return None


def gemv(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    prologue: int = PLAIN,
    residual: torch.Tensor | None = None,
    norm_weight: torch.Tensor | None = None,
    eps: float = 0.0,
    tuning: dict | None = None,
    epilogue: int = OUT,
    sumsq: torch.Tensor | None = None,
    preload: bool | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None] | None:
    """(y, new_residual) with y = prologue(x) W^T (+ bias), [1, N] in x's dtype; None if the shape has no config (the
    caller falls back to torch).

    x: [1, K] contiguous; for SILU_MUL [1, 2K] = cat(gate, up). NORM: rms_norm(x) * norm_weight. ADD_NORM: the same of
    x + residual, which is also returned as new_residual (written once, by the first program), as
    kernels/norm.py's fused_add_rms_norm_ref does. NORM_SUMSQ: rms_norm(x) * norm_weight with x's sum of squares
    given as partial sums (`sumsq`, float32, from an ADD_RES_SUMSQ call). SILU_MUL_OUT: weight [2N, K] = cat(gate,
    up), y = [1, N] silu(gate) * up (no bias). ADD_RES_SUMSQ: y = that + residual, and the second value returned is
    the partial sums of y's squares (one per program, float32) instead of a new residual. tuning: launch overrides
    for bench/tune_gemv.py (block_n, block_k, num_warps, num_stages). preload: the first weight chunk read before
    the PDL wait (default `PRELOAD`).
    """
    if (prologue == NORM_SUMSQ) != (sumsq is not None) or (epilogue == ADD_RES_SUMSQ and residual is None):
        raise ValueError("NORM_SUMSQ takes sumsq (and nothing else does); ADD_RES_SUMSQ takes a residual")
    if prologue == NORM_SUMSQ and epilogue == ADD_RES_SUMSQ:
        raise ValueError("NORM_SUMSQ and ADD_RES_SUMSQ share the sumsq argument: one of them per call")
    n, k = weight.shape
    tuning = tuning or {}
    config = gemv_config(n, k)
    if config is None or weight.stride(1) != 1 or not x.is_contiguous():
        return None
    if epilogue == SILU_MUL_OUT:
        if n % 2 or bias is not None:
            return None
        n //= 2
        config = (max(1, config[0] // 2), *config[1:])  # each program reads as many rows as without the epilogue
    config = (tuning.get("block_n", config[0]), tuning.get("block_k", config[1]), tuning.get("num_warps", config[2]))
    if (prologue == ADD_NORM or epilogue == ADD_RES_SUMSQ) and not residual.is_contiguous():
        return None
    block_n, block_k, num_warps = config
    programs = triton.cdiv(n, block_n)
    y = torch.empty(1, n, dtype=x.dtype, device=x.device)
    new_residual = torch.empty_like(residual) if prologue == ADD_NORM else None
    if epilogue == ADD_RES_SUMSQ:
        sumsq = new_residual = torch.empty(programs, dtype=torch.float32, device=x.device)
    _gemv_kernel[(programs,)](
        x,
        weight,
        bias if bias is not None else weight,
        y,
        residual if residual is not None else x,
        norm_weight if norm_weight is not None else x,
        new_residual if new_residual is not None else y,
        sumsq if sumsq is not None else y,
        sumsq.numel() if sumsq is not None else 0,
        n,
        k,
        weight.stride(0),
        eps,
        HAS_BIAS=bias is not None,
        PROLOGUE=prologue,
        EPILOGUE=epilogue,
        BLOCK_N=block_n,
        BLOCK_K=block_k,
        SUMSQ_PAD=triton.next_power_of_2(sumsq.numel()) if prologue == NORM_SUMSQ else 1,
        PRELOAD=bool(PRELOAD if preload is None else preload),
        TRIGGER_AFTER_WAIT=bool(TRIGGER_AFTER_WAIT),
        num_warps=num_warps,
        **({"num_stages": tuning["num_stages"]} if "num_stages" in tuning else {}),
        **pdl.launch_options(x.device),
    )
    return y, new_residual

"""Batch-1 linear layer, Triton: y = x W^T (+ b) for one row x, the GEMV of every batch-1 decode step.

Same function as `torch.nn.functional.linear` (the reference). At batch 1 a projection streams its weight once and does
two FLOPs a weight: the only thing that matters is how close the weight read gets to the memory bandwidth. cuBLAS's
batch-1 kernels leave some on the table on the Llama-3-8B shapes; this plain kernel (each program a few whole rows,
a [BLOCK_N, BLOCK_K] float32 accumulator summed once at the end) reads them faster. H200, weights too big for L2
(bench/tune_gemv.py), fraction of the copy-bandwidth floor, cuBLAS -> this kernel: qkv 0.76 -> 0.87, o 0.65 -> 0.75,
gate_up 1.02 -> 1.05, down 0.93 -> 0.98, lm_head 1.07 -> 1.10 (above 1: a read-only stream beats a copy's rate).
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from kernels import pdl

# What the kernel computes its input row from (PROLOGUE): the row itself, or RMSNorm of the row or of row + residual
# (the layer norms, fused into the projection after them). Measured on an H200 (batch-1 decode, 8B shape): slower
# (0.787 vs 0.81 of the floor), so off unless KVRELAY_FUSE=norm (kernels/ops.py): every program recomputes the norm of
# the whole row at the head of its critical path. A silu(gate) * up prologue for the down projection was slower still
# (0.77) and is gone; the activation is now an epilogue of the gate_up projection instead (GATED), computed once.
PLAIN, NORM, ADD_NORM = 0, 1, 2

# Load the first weight chunk before waiting for the previous kernel (kernels/pdl.py): the weights do not depend on
# it, so with PDL those loads are in flight while it finishes. KVRELAY_GEMV_PRELOAD=0 turns it off. H200, batch-1
# decode, fraction of the floor, alternating within one process: off 0.763 / 0.759, on 0.771 / 0.773.
PRELOAD = os.environ.get("KVRELAY_GEMV_PRELOAD", "1") != "0"
# Tried and dropped (H200, batch-1 decode at 1k context, fraction of the floor by L2 budget): prefetching the first
# columns of every row into L2 (prefetch.global.L2) before the wait: 0 MB 0.847, 8 MB 0.841, 16 MB 0.827, 32 MB 0.806.


@triton.jit
def _input_chunk(x_ptr, res_ptr, nw_ptr, new_res_ptr, offs, inv_rms, WRITE_RES, PROLOGUE: tl.constexpr):
    """x's chunk `offs` as the GEMV consumes it (float32 holding values of x's dtype), rounded where the unfused
    kernels round (kernels/norm.py)."""
    x = tl.load(x_ptr + offs).to(tl.float32)
    if PROLOGUE >= 1:
        if PROLOGUE == 2:
            x = (x + tl.load(res_ptr + offs).to(tl.float32)).to(x_ptr.dtype.element_ty)
            if WRITE_RES:
                tl.store(new_res_ptr + offs, x)
            x = x.to(tl.float32)
        normed = (x * inv_rms).to(x_ptr.dtype.element_ty).to(tl.float32)
        x = (tl.load(nw_ptr + offs).to(tl.float32) * normed).to(x_ptr.dtype.element_ty).to(tl.float32)
    return x


@triton.jit
def _gemv_kernel(x_ptr, w_ptr, b_ptr, y_ptr, res_ptr, nw_ptr, new_res_ptr, N, K, stride_wn, eps,
                 HAS_BIAS: tl.constexpr, PROLOGUE: tl.constexpr, GATED: tl.constexpr, BLOCK_N: tl.constexpr,
                 BLOCK_K: tl.constexpr, PRELOAD: tl.constexpr, PDL: tl.constexpr):  # fmt: skip
    """y[n] for the program's BLOCK_N outputs; GATED: the weight holds 2N rows (gate, then up) and
    y = silu(x W_gate^T) * (x W_up^T), each program reading its gate rows and the matching up rows."""
    pid = tl.program_id(0)
    offs_n = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    mask_n = offs_n < N
    # Row offsets in int64 ([BLOCK_N] only): an lm_head's N * K exceeds 2^31.
    w_ptrs = w_ptr + offs_n[:, None].to(tl.int64) * stride_wn + offs_k[None, :]
    u_ptrs = w_ptrs + N.to(tl.int64) * stride_wn  # the up rows (GATED only)
    if PRELOAD:
        w_first = tl.load(w_ptrs, mask=mask_n[:, None], other=0.0)
        if GATED:
            u_first = tl.load(u_ptrs, mask=mask_n[:, None], other=0.0)
    pdl.wait(PDL)  # nothing else is read before the previous kernel is done (kernels/pdl.py)
    inv_rms = 0.0
    if PROLOGUE >= 1:
        # Every program needs the norm of the whole row: a first pass over it (8 KB at hidden 4096, from L2).
        squares = tl.zeros([BLOCK_K], dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            x = tl.load(x_ptr + k0 + offs_k).to(tl.float32)
            if PROLOGUE == 2:
                x = (x + tl.load(res_ptr + k0 + offs_k).to(tl.float32)).to(x_ptr.dtype.element_ty).to(tl.float32)
            squares += x * x
        # correctly rounded, as kernels/triton_norm.py
        inv_rms = tl.math.div_rn(1.0, tl.math.sqrt_rn(tl.math.div_rn(tl.sum(squares, axis=0), K.to(tl.float32)) + eps))
    acc = tl.zeros([BLOCK_N, BLOCK_K], dtype=tl.float32)
    acc_u = tl.zeros([BLOCK_N, BLOCK_K], dtype=tl.float32)
    if PRELOAD:
        x = _input_chunk(x_ptr, res_ptr, nw_ptr, new_res_ptr, offs_k, inv_rms, pid == 0, PROLOGUE)
        acc += w_first.to(tl.float32) * x[None, :]
        if GATED:
            acc_u += u_first.to(tl.float32) * x[None, :]
    for k0 in range(BLOCK_K if PRELOAD else 0, K, BLOCK_K):  # K is a multiple of BLOCK_K (`gemv_config`)
        x = _input_chunk(x_ptr, res_ptr, nw_ptr, new_res_ptr, k0 + offs_k, inv_rms, pid == 0, PROLOGUE)
        w = tl.load(w_ptrs + k0, mask=mask_n[:, None], other=0.0)
        acc += w.to(tl.float32) * x[None, :]
        if GATED:
            u = tl.load(u_ptrs + k0, mask=mask_n[:, None], other=0.0)
            acc_u += u.to(tl.float32) * x[None, :]
    pdl.trigger(PDL)  # after the loop: a multi-wave grid keeps its SMs until then
    y = tl.sum(acc, axis=1)
    if HAS_BIAS:
        y += tl.load(b_ptr + offs_n, mask=mask_n, other=0.0).to(tl.float32)
    if GATED:
        up = tl.sum(acc_u, axis=1)
        if HAS_BIAS:
            up += tl.load(b_ptr + N + offs_n, mask=mask_n, other=0.0).to(tl.float32)
        # rounded to the output dtype first, as the unfused projection's output is (kernels/activation.py)
        gate = y.to(y_ptr.dtype.element_ty).to(tl.float32)
        up = up.to(y_ptr.dtype.element_ty).to(tl.float32)
        y = gate / (1.0 + tl.exp(-gate)) * up
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
    gated: bool = False,
    tuning: dict | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None] | None:
    """(y, new_residual) with y = prologue(x) W^T (+ bias), [1, N] in x's dtype; None if the shape has no config (the
    caller falls back to torch).

    x: [1, K] contiguous. NORM: rms_norm(x) * norm_weight. ADD_NORM: the same of x + residual, which is also returned
    as new_residual (written once, by the first program), as kernels/norm.py's fused_add_rms_norm_ref does. gated:
    weight is [2N, K] = cat(gate, up) and y = silu_and_mul(prologue(x) W^T (+ bias)), [1, N]. tuning: launch
    overrides for bench/tune_gemv.py (block_n, block_k, num_warps, num_stages, preload).
    """
    rows, k = weight.shape
    n = rows // 2 if gated else rows
    tuning = tuning or {}
    config = gemv_config(rows, k)
    if config is None or weight.stride(1) != 1 or not x.is_contiguous() or (gated and rows % 2):
        return None
    # gated: each program reads block_n gate rows and block_n up rows, the tuned number of rows in all
    block_n = tuning.get("block_n", max(1, config[0] // 2) if gated else config[0])
    block_k, num_warps = tuning.get("block_k", config[1]), tuning.get("num_warps", config[2])
    if prologue == ADD_NORM and not residual.is_contiguous():
        return None
    y = torch.empty(1, n, dtype=x.dtype, device=x.device)
    new_residual = torch.empty_like(residual) if prologue == ADD_NORM else None
    _gemv_kernel[(triton.cdiv(n, block_n),)](
        x,
        weight,
        bias if bias is not None else weight,
        y,
        residual if residual is not None else x,
        norm_weight if norm_weight is not None else x,
        new_residual if new_residual is not None else y,
        n,
        k,
        weight.stride(0),
        eps,
        HAS_BIAS=bias is not None,
        PROLOGUE=prologue,
        GATED=gated,
        BLOCK_N=block_n,
        BLOCK_K=block_k,
        PRELOAD=tuning.get("preload", PRELOAD),
        num_warps=num_warps,
        **({"num_stages": tuning["num_stages"]} if "num_stages" in tuning else {}),
        **pdl.launch_options(x.device),
    )
    return y, new_residual

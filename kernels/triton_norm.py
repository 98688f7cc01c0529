"""RMSNorm and fused residual-add + RMSNorm, Triton. Same contract as kernels/norm.py's references.

One program per row: the row is loaded once, reduced in float32, normalized, rounded to x's dtype, then multiplied by
the weight and rounded again, in the reference's order. The one difference left is the order of the float32 sum of
squares (a tree here), which can move a result by one ulp of x's dtype, rarely.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kernels import pdl

# The norm weight is read before the PDL wait (it is a constant: no kernel writes it). After the wait it came after the
# row's reduction and the new residual's store (a load the compiler may not move above a store), one more round trip
# on the path of every norm of a batch-64 step (65 of them). H200, decode batch 64 x 1k, on / off alternating in one
# process: 5.978 / 5.994 ms a step against 6.008 / 6.013 (bench/results/tune_settings_2026-12-04d.json). Read at each
# call, for in-process A/B (`model_bench --sweep kernels.triton_norm.EARLY_WEIGHT=1,0`).
EARLY_WEIGHT = True
# Tried and dropped: letting the next kernel (a decode batch's skinny GEMM) launch at this one's start, before its
# wait (kernels/pdl.py). Slower (H200, one process, on / off alternating, bench/results/tune_settings_2026-12-04q.json):
# batch 8 5.004 / 4.678 and 5.003 / 4.683 ms a step, batch 64 6.015 / 5.892 and 6.014 / 5.901. Why is not
# established: the skinny GEMM's parked programs can only take SMs that every program of the GEMM before the norm has
# already reached.


@triton.jit
def _rms_norm_kernel(
    x_ptr,  # [num_rows, hidden]; NUM_PARTS: [NUM_PARTS, num_rows, hidden] float32 partial sums of x
    residual_ptr,  # [num_rows, hidden] (unused unless HAS_RESIDUAL)
    weight_ptr,  # [hidden]
    out_ptr,  # [num_rows, hidden] in x's dtype
    new_residual_ptr,  # [num_rows, hidden] in x's dtype (unused unless HAS_RESIDUAL)
    stride_x,
    stride_residual,
    stride_out,
    stride_new_residual,
    stride_part,  # NUM_PARTS: the distance between two parts
    hidden,
    eps,
    BLOCK: tl.constexpr,
    HAS_RESIDUAL: tl.constexpr,
    EARLY_WEIGHT: tl.constexpr,
    NUM_PARTS: tl.constexpr,
    PDL: tl.constexpr,
):
    offs = tl.arange(0, BLOCK)
    mask = offs < hidden
    if EARLY_WEIGHT:
        weight = tl.load(weight_ptr + offs, mask=mask, other=0.0).to(tl.float32)  # a constant (`EARLY_WEIGHT`)
    # nothing else is read before the previous kernel is done; the next kernels may launch (kernels/pdl.py)
    pdl.enter(PDL)
    row = tl.program_id(0).to(tl.int64)
    if NUM_PARTS > 0:
        # x as a projection would have stored it: its partial sums added in order, rounded to the output's dtype
        x = tl.zeros([BLOCK], dtype=tl.float32)
        for part in tl.static_range(NUM_PARTS):
            x += tl.load(x_ptr + part * stride_part + row * stride_x + offs, mask=mask, other=0.0)
        x = x.to(out_ptr.dtype.element_ty).to(tl.float32)
    else:
        x = tl.load(x_ptr + row * stride_x + offs, mask=mask, other=0.0).to(tl.float32)
    if HAS_RESIDUAL:
        residual = tl.load(residual_ptr + row * stride_residual + offs, mask=mask, other=0.0).to(tl.float32)
        # Rounded to x's dtype before the norm reads it: the norm sees what the next layer adds to.
        rounded = (x + residual).to(out_ptr.dtype.element_ty)
        tl.store(new_residual_ptr + row * stride_new_residual + offs, rounded, mask=mask)
        x = rounded.to(tl.float32)
    # Correctly rounded mean, sqrt and reciprocal, as torch computes mean() and rsqrt() on the CPU.
    mean_square = tl.math.div_rn(tl.sum(x * x, axis=0), hidden.to(tl.float32))
    inv_rms = tl.math.div_rn(1.0, tl.math.sqrt_rn(mean_square + eps))
    normed = (x * inv_rms).to(out_ptr.dtype.element_ty).to(tl.float32)
    if not EARLY_WEIGHT:
        weight = tl.load(weight_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    # One float32 product of two values of at most 16-bit dtypes is exact, so rounding it once equals torch's
    # multiply in the promoted dtype followed by .to(x.dtype).
    tl.store(out_ptr + row * stride_out + offs, (weight * normed).to(out_ptr.dtype.element_ty), mask=mask)


def _num_warps(block: int) -> int:
    # Enough threads that each holds <= ~16 float32 of the row (no spills at hidden 16k).
    return max(1, min(16, block // 512))


def _as_rows(t: torch.Tensor, hidden: int) -> torch.Tensor:
    """[..., hidden] -> [num_rows, hidden] with unit stride along hidden (a view when possible)."""
    if t.stride(-1) != 1:
        t = t.contiguous()
    return t.reshape(-1, hidden)


def _launch(x: torch.Tensor, residual: torch.Tensor | None, weight: torch.Tensor, eps: float,
            parts: torch.Tensor | None = None):  # fmt: skip
    """The kernel on x's rows; with `parts` ([S, *x.shape] float32), x is their sum rounded to x's dtype and `x`
    itself only gives the shape and dtype."""
    hidden = x.shape[-1]
    if weight.shape != (hidden,):
        raise ValueError(f"weight must be [hidden={hidden}], got {tuple(weight.shape)}")
    if residual is not None and residual.shape != x.shape:
        raise ValueError(f"residual {tuple(residual.shape)} and x {tuple(x.shape)} differ")
    if parts is not None:
        if parts.shape[1:] != x.shape or parts.dtype != torch.float32 or not parts.is_contiguous():
            raise ValueError(f"parts must be contiguous float32 [S, {', '.join(map(str, x.shape))}]")
        x_rows = parts.view(parts.shape[0], -1, hidden)[0]
    else:
        x_rows = _as_rows(x, hidden)
    num_rows = x_rows.shape[0]
    out = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    out_rows = out.view(-1, hidden)
    if residual is not None:
        residual_rows = _as_rows(residual, hidden)
        new_residual = torch.empty(x.shape, dtype=x.dtype, device=x.device)
        new_residual_rows = new_residual.view(-1, hidden)
    else:
        # Stand-ins, never read or written.
        residual_rows, new_residual, new_residual_rows = x_rows, None, out_rows
    if num_rows > 0 and hidden > 0:
        block = triton.next_power_of_2(hidden)
        _rms_norm_kernel[(num_rows,)](
            x_rows,
            residual_rows,
            weight.contiguous(),
            out_rows,
            new_residual_rows,
            x_rows.stride(0),
            residual_rows.stride(0),
            out_rows.stride(0),
            new_residual_rows.stride(0),
            parts.stride(0) if parts is not None else 0,
            hidden,
            eps,
            BLOCK=block,
            HAS_RESIDUAL=residual is not None,
            EARLY_WEIGHT=bool(EARLY_WEIGHT),
            NUM_PARTS=parts.shape[0] if parts is not None else 0,
            num_warps=_num_warps(block),
            **pdl.launch_options(x.device),
        )
    return out, new_residual


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """x [..., hidden], weight [hidden] -> [..., hidden] in x's dtype."""
    out, _ = _launch(x, None, weight, eps)
    return out


def fused_add_rms_norm(
    x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """new_residual = x + residual (added in float32, rounded to x's dtype); normed = rms_norm(new_residual).

    x, residual: [..., hidden]; returns (normed, new_residual), both new tensors [..., hidden] in x's dtype.
    """
    out, new_residual = _launch(x, residual, weight, eps)
    assert new_residual is not None
    return out, new_residual


def fused_add_rms_norm_parts(
    parts: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """fused_add_rms_norm of x = parts.sum(0) rounded to residual's dtype: the float32 partial sums a split-K
    projection leaves (kernels/triton_skinny_gemm.py, splits), added here instead of by a kernel of their own.

    parts: [S, ..., hidden] float32, contiguous; residual: [..., hidden]. Returns (normed, new_residual).
    """
    return _launch(residual, residual, weight, eps, parts)

"""Rotary position embedding (neox style), Triton. Same contract as kernels/rotary.rotary_ref: out-of-place, float32
math with the cache's values, results in the inputs' dtypes, dims past rot_dim copied unchanged.

One program per token rotates all its query and key heads: the token's cos/sin row is read once for both.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kernels import pdl
from kernels.rotary import check_rotary_args


@triton.jit
def _rotate_heads(
    x_ptr,  # this token's [num_heads, head_dim] row of the input
    out_ptr,  # this token's [num_heads, head_dim] row of the output
    stride_xh,
    stride_oh,
    num_heads,
    cos,  # [BLOCK_HALF] float32
    sin,
    HALF: tl.constexpr,
    BLOCK_HALF: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK_TAIL: tl.constexpr,
    BLOCK_H: tl.constexpr,
):
    heads = tl.arange(0, BLOCK_H)
    j = tl.arange(0, BLOCK_HALF)
    mask = (heads < num_heads)[:, None] & (j < HALF)[None, :]
    x_first = x_ptr + heads[:, None] * stride_xh + j[None, :]
    o_first = out_ptr + heads[:, None] * stride_oh + j[None, :]
    x1 = tl.load(x_first, mask=mask, other=0.0).to(tl.float32)
    x2 = tl.load(x_first + HALF, mask=mask, other=0.0).to(tl.float32)
    out_dtype = out_ptr.dtype.element_ty
    tl.store(o_first, (x1 * cos[None, :] - x2 * sin[None, :]).to(out_dtype), mask=mask)
    tl.store(o_first + HALF, (x2 * cos[None, :] + x1 * sin[None, :]).to(out_dtype), mask=mask)
    if BLOCK_TAIL > 0:
        # Partial rotary: dims [2 * HALF, HEAD_DIM) are copied as they are.
        t = 2 * HALF + tl.arange(0, BLOCK_TAIL)
        tail_mask = (heads < num_heads)[:, None] & (t < HEAD_DIM)[None, :]
        tail = tl.load(x_ptr + heads[:, None] * stride_xh + t[None, :], mask=tail_mask)
        tl.store(out_ptr + heads[:, None] * stride_oh + t[None, :], tail, mask=tail_mask)


@triton.jit
def _rotary_kernel(
    positions_ptr,  # [num_tokens] int
    q_ptr,  # [num_tokens, num_heads, head_dim]
    k_ptr,  # [num_tokens, num_kv_heads, head_dim]
    q_out_ptr,
    k_out_ptr,
    cache_ptr,  # [max_positions, rot_dim] = cat(cos, sin)
    stride_qt,
    stride_qh,
    stride_kt,
    stride_kh,
    stride_qot,
    stride_qoh,
    stride_kot,
    stride_koh,
    stride_cache,
    num_heads,
    num_kv_heads,
    HALF: tl.constexpr,
    BLOCK_HALF: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK_TAIL: tl.constexpr,
    BLOCK_H: tl.constexpr,
    BLOCK_KH: tl.constexpr,
    PDL: tl.constexpr,
):
    pdl.enter(PDL)  # nothing is read before the previous kernel is done; the next kernels may launch (kernels/pdl.py)
    token = tl.program_id(0).to(tl.int64)
    position = tl.load(positions_ptr + token).to(tl.int64)
    j = tl.arange(0, BLOCK_HALF)
    cache_row = cache_ptr + position * stride_cache
    cos = tl.load(cache_row + j, mask=j < HALF, other=0.0).to(tl.float32)
    sin = tl.load(cache_row + HALF + j, mask=j < HALF, other=0.0).to(tl.float32)
    _rotate_heads(
        q_ptr + token * stride_qt, q_out_ptr + token * stride_qot, stride_qh, stride_qoh, num_heads, cos, sin,
        HALF, BLOCK_HALF, HEAD_DIM, BLOCK_TAIL, BLOCK_H,
    )  # fmt: skip
    _rotate_heads(
        k_ptr + token * stride_kt, k_out_ptr + token * stride_kot, stride_kh, stride_koh, num_kv_heads, cos, sin,
        HALF, BLOCK_HALF, HEAD_DIM, BLOCK_TAIL, BLOCK_KH,
    )  # fmt: skip


def rotary(
    positions: torch.Tensor, query: torch.Tensor, key: torch.Tensor, cos_sin_cache: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotate query [num_tokens, num_heads, head_dim] and key [num_tokens, num_kv_heads, head_dim] by their
    positions [num_tokens] (int). Returns new (query, key) in their dtypes; math in float32 with the cache's values.

    query and key may be strided views (e.g. slices of a fused qkv projection) as long as head_dim is contiguous.
    """
    num_tokens, num_heads, head_dim = query.shape
    rot_dim = check_rotary_args(positions, query, key, cos_sin_cache)
    if query.stride(-1) != 1:
        query = query.contiguous()
    if key.stride(-1) != 1:
        key = key.contiguous()
    cos_sin_cache = cos_sin_cache.contiguous()
    q_out = torch.empty(query.shape, dtype=query.dtype, device=query.device)
    k_out = torch.empty(key.shape, dtype=key.dtype, device=key.device)
    if num_tokens == 0:
        return q_out, k_out
    half = rot_dim // 2
    tail = head_dim - rot_dim
    num_kv_heads = key.shape[1]
    block_h = triton.next_power_of_2(num_heads)
    block_half = triton.next_power_of_2(half)
    _rotary_kernel[(num_tokens,)](
        positions,
        query,
        key,
        q_out,
        k_out,
        cos_sin_cache,
        query.stride(0),
        query.stride(1),
        key.stride(0),
        key.stride(1),
        q_out.stride(0),
        q_out.stride(1),
        k_out.stride(0),
        k_out.stride(1),
        cos_sin_cache.stride(0),
        num_heads,
        num_kv_heads,
        HALF=half,
        BLOCK_HALF=block_half,
        HEAD_DIM=head_dim,
        BLOCK_TAIL=triton.next_power_of_2(tail) if tail > 0 else 0,
        BLOCK_H=block_h,
        BLOCK_KH=triton.next_power_of_2(num_kv_heads),
        # ~8 float32 pairs per thread for the query heads of the token.
        num_warps=max(1, min(8, block_h * block_half // 256)),
        **pdl.launch_options(query.device),
    )
    return q_out, k_out

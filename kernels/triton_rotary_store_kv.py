"""rotary + store_kv in one kernel, Triton. Same function as `rotary_store_kv_ref` (kernels/rotary_store_kv.py): the
query rotated (returned, out of place as kernels/triton_rotary.py does), the key rotated and, with the value,
quantized into the pool at the slots (as kernels/triton_store_kv.py does). Where the two kernels would write the
rotated key to memory and read it back, this one keeps it in registers.

Same bits as the two kernels in sequence:
- The rotated key is rounded to the key's dtype before it is quantized, as it is when the rotary kernel writes it.
  bf16 rounds to nearest even on the bits (`_round_to_bf16`; the interpreter's float32 -> bf16 cast truncates), which
  is what a GPU's cast does, so the result does not depend on where it runs. The query is rounded the same way.
- The rotation is the same float32 arithmetic. x1 * cos - x2 * sin and x2 * cos + x1 * sin leave the compiler a
  choice: which product it fuses with the sum into an FMA. The rotary kernel, compiled by Triton 3.6 for sm_90,
  fuses x1 * cos in the first and x1 * sin in the second (read off its PTX); this kernel writes that choice out with
  `tl.fma`, so its bits do not hang on the compiler's. The interpreter's `tl.fma` rounds the product and the sum
  separately, as the torch reference does.
- Quantization is store_kv's own code (`_store_at_slot`) on the same float32 values.

Grid (num_tokens, 2): program (t, 0) rotates token t's query heads, program (t, 1) rotates its key heads and stores
its K and V. The two halves of a decode step's work run side by side instead of one after the other.

Used for any number of tokens (prefill too): per token it reads and writes a subset of what the two kernels do (the
rotated key is neither written nor read back), with the same per-token parallelism, and it is one launch less.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kernels import pdl
from kernels.rotary import check_rotary_args
from kernels.store_kv import check_store_kv_args
from kernels.triton_store_kv import _round_to_bf16, _store_at_slot, quantize_constexprs, scale_args
from kvstore.pool import LayerKV

# Read by kernels/ops.py at each call: False sends rotary_store_kv to the rotary and store_kv kernels in sequence, an
# A/B in one process (bench/model_bench.py --sweep kernels.triton_rotary_store_kv.FUSED=0,1).
FUSED = True


@triton.jit
def _round_to_element_of(x, ptr):
    """float32 x rounded to nearest even in ptr's element type (bf16, fp16 or float32), still as float32: the later
    cast to that type is exact."""
    if ptr.dtype.element_ty == tl.bfloat16:
        return _round_to_bf16(x)
    elif ptr.dtype.element_ty == tl.float16:
        return x.to(tl.float16).to(tl.float32)
    else:
        return x


@triton.jit
def _rotated_rows(
    x_ptr,  # this token's [num_heads, head_dim] rows
    stride_h,
    heads,  # [H_PAD] head indices
    num_heads,
    offs_d,  # [DIM_PAD]
    lo,  # [DIM_PAD]: the first-half dim of d's pair (d - HALF in the second half), d itself past the rotated dims
    c_lo,  # [DIM_PAD] float32: cos in the first half, sin in the second
    c_hi,  # [DIM_PAD] float32: -sin in the first half, cos in the second
    ROT_DIM: tl.constexpr,
    HALF: tl.constexpr,
    HEAD_DIM: tl.constexpr,
):
    """[H_PAD, DIM_PAD] float32, 0 for padded heads and dims: the heads rotated (dims past ROT_DIM as they are) and
    rounded to x's dtype."""
    head_mask = (heads < num_heads)[:, None]
    rows = x_ptr + heads[:, None] * stride_h
    rotated_dims = (offs_d < ROT_DIM)[None, :]
    # x1 and x2 of each dim's pair, as [H_PAD, DIM_PAD] tiles (each element loaded twice: the second load hits L1).
    x1 = tl.load(rows + lo[None, :], mask=head_mask & (offs_d < HEAD_DIM)[None, :], other=0.0).to(tl.float32)
    x2 = tl.load(rows + lo[None, :] + HALF, mask=head_mask & rotated_dims, other=0.0).to(tl.float32)
    # First half x1 * cos - x2 * sin, second half x2 * cos + x1 * sin, the x1 product fused into an FMA in both.
    rotated = tl.fma(x1, c_lo[None, :], x2 * c_hi[None, :])
    return _round_to_element_of(tl.where(rotated_dims, rotated, x1), x_ptr)


@triton.jit
def _rope_factors(positions_ptr, token, cache_ptr, stride_cache, offs_d, HALF: tl.constexpr):
    """(lo, c_lo, c_hi) of `_rotated_rows` for the token at positions[token]: its cos/sin laid out over a head's dims
    (frequency d mod HALF)."""
    position = tl.load(positions_ptr + token).to(tl.int64)
    first = offs_d < HALF
    second = (offs_d >= HALF) & (offs_d < 2 * HALF)
    lo = tl.where(second, offs_d - HALF, offs_d)
    cache_row = cache_ptr + position * stride_cache
    cos = tl.load(cache_row + lo, mask=first | second, other=0.0).to(tl.float32)
    sin = tl.load(cache_row + HALF + lo, mask=first | second, other=0.0).to(tl.float32)
    return lo, tl.where(first, cos, sin), tl.where(first, -sin, cos)


@triton.jit
def _rotate_store_token(
    k_row_ptr,  # the token's [num_kv_heads, head_dim] key rows
    v_row_ptr,
    stride_kh,
    stride_vh,
    slot,  # int64; -1: a padding token, nothing is stored
    kv_heads,  # [BLOCK_KH] the heads to store; those >= num_kv_heads are masked off
    num_kv_heads,
    block_size,
    offs_d,
    lo,
    c_lo,
    c_hi,
    k_cache_ptr,
    v_cache_ptr,
    k_scale_ptr,
    v_scale_ptr,
    stride_kc_b,
    stride_kc_s,
    stride_kc_h,
    stride_kc_d,
    stride_vc_b,
    stride_vc_s,
    stride_vc_h,
    stride_vc_d,
    stride_ks_b,
    stride_ks_s,
    stride_ks_h,
    stride_vs_b,
    stride_vs_s,
    stride_vs_h,
    HALF: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    K_MODE: tl.constexpr,
    V_MODE: tl.constexpr,
    K_QMAX: tl.constexpr,
    V_QMAX: tl.constexpr,
    K_INV_QMAX: tl.constexpr,
    V_INV_QMAX: tl.constexpr,
    RECIPROCAL: tl.constexpr,
    FP8_MIN_NORMAL_EXP: tl.constexpr,
    FP8_MANTISSA_BITS: tl.constexpr,
):
    """One token's key rotated and, with its value, quantized into the pool at `slot` (kv_heads of it)."""
    valid = slot >= 0
    block = slot // block_size
    offset = slot % block_size
    head_mask = (kv_heads < num_kv_heads) & valid
    mask = head_mask[:, None] & (offs_d < HEAD_DIM)[None, :]
    # The value's load is issued before the key's arithmetic: both are in flight together.
    value = tl.load(v_row_ptr + kv_heads[:, None] * stride_vh + offs_d[None, :], mask=mask, other=0.0).to(tl.float32)
    # A padding token's key is rotated too, but nothing of it is stored: every store is masked by `valid`.
    key = _rotated_rows(k_row_ptr, stride_kh, kv_heads, num_kv_heads, offs_d, lo, c_lo, c_hi, 2 * HALF, HALF,
                        HEAD_DIM)  # fmt: skip
    _store_at_slot(key, mask, head_mask, k_cache_ptr, k_scale_ptr, block, offset, kv_heads, offs_d, stride_kc_b,
                   stride_kc_s, stride_kc_h, stride_kc_d, stride_ks_b, stride_ks_s, stride_ks_h, K_MODE, K_QMAX,
                   K_INV_QMAX, RECIPROCAL, FP8_MIN_NORMAL_EXP, FP8_MANTISSA_BITS)  # fmt: skip
    _store_at_slot(value, mask, head_mask, v_cache_ptr, v_scale_ptr, block, offset, kv_heads, offs_d, stride_vc_b,
                   stride_vc_s, stride_vc_h, stride_vc_d, stride_vs_b, stride_vs_s, stride_vs_h, V_MODE, V_QMAX,
                   V_INV_QMAX, RECIPROCAL, FP8_MIN_NORMAL_EXP, FP8_MANTISSA_BITS)  # fmt: skip


@triton.jit
def _rotary_store_kv_kernel(
    positions_ptr,  # [num_tokens] int
    q_ptr,  # [num_tokens, num_heads, head_dim]
    k_ptr,  # [num_tokens, num_kv_heads, head_dim]
    v_ptr,  # [num_tokens, num_kv_heads, head_dim]
    q_out_ptr,  # [num_tokens, num_heads, head_dim]
    cache_ptr,  # [max_positions, rot_dim] = cat(cos, sin)
    slot_mapping_ptr,  # [num_tokens]
    k_cache_ptr,  # [num_blocks, block_size, num_kv_heads, head_dim] (any strides)
    v_cache_ptr,
    k_scale_ptr,  # [num_blocks, block_size, num_kv_heads] float32 (any tensor if K is unscaled)
    v_scale_ptr,
    stride_qt,
    stride_qh,
    stride_kt,
    stride_kh,
    stride_vt,
    stride_vh,
    stride_qot,
    stride_qoh,
    stride_cache,
    stride_kc_b,
    stride_kc_s,
    stride_kc_h,
    stride_kc_d,
    stride_vc_b,
    stride_vc_s,
    stride_vc_h,
    stride_vc_d,
    stride_ks_b,
    stride_ks_s,
    stride_ks_h,
    stride_vs_b,
    stride_vs_s,
    stride_vs_h,
    num_heads,
    num_kv_heads,
    block_size,
    HALF: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    DIM_PAD: tl.constexpr,
    BLOCK_H: tl.constexpr,
    BLOCK_KH: tl.constexpr,
    K_MODE: tl.constexpr,
    V_MODE: tl.constexpr,
    K_QMAX: tl.constexpr,
    V_QMAX: tl.constexpr,
    K_INV_QMAX: tl.constexpr,
    V_INV_QMAX: tl.constexpr,
    RECIPROCAL: tl.constexpr,
    FP8_MIN_NORMAL_EXP: tl.constexpr,
    FP8_MANTISSA_BITS: tl.constexpr,
    PDL: tl.constexpr,
):
    pdl.enter(PDL)  # nothing is read before the previous kernel is done; the next kernels may launch (kernels/pdl.py)
    token = tl.program_id(0).to(tl.int64)
    role = tl.program_id(1)  # 0: the query heads; 1: the key heads, then the K/V store

    offs_d = tl.arange(0, DIM_PAD)
    lo, c_lo, c_hi = _rope_factors(positions_ptr, token, cache_ptr, stride_cache, offs_d, HALF)

    # Each branch names its own variables: Triton requires a name bound in both branches of an if to have one type.
    if role == 0:
        q_heads = tl.arange(0, BLOCK_H)
        q = _rotated_rows(q_ptr + token * stride_qt, stride_qh, q_heads, num_heads, offs_d, lo, c_lo, c_hi,
                          2 * HALF, HALF, HEAD_DIM)  # fmt: skip
        q_mask = (q_heads < num_heads)[:, None] & (offs_d < HEAD_DIM)[None, :]
        q_out = q_out_ptr + token * stride_qot + q_heads[:, None] * stride_qoh + offs_d[None, :]
        tl.store(q_out, q.to(q_out_ptr.dtype.element_ty), mask=q_mask)
    else:
        # slot -1 marks a padding token: every store is masked off (as in store_kv).
        slot = tl.load(slot_mapping_ptr + token).to(tl.int64)
        _rotate_store_token(k_ptr + token * stride_kt, v_ptr + token * stride_vt, stride_kh, stride_vh, slot,
                            tl.arange(0, BLOCK_KH), num_kv_heads, block_size, offs_d, lo, c_lo, c_hi, k_cache_ptr,
                            v_cache_ptr, k_scale_ptr, v_scale_ptr, stride_kc_b, stride_kc_s, stride_kc_h, stride_kc_d,
                            stride_vc_b, stride_vc_s, stride_vc_h, stride_vc_d, stride_ks_b, stride_ks_s, stride_ks_h,
                            stride_vs_b, stride_vs_s, stride_vs_h, HALF, HEAD_DIM, K_MODE, V_MODE, K_QMAX, V_QMAX,
                            K_INV_QMAX, V_INV_QMAX, RECIPROCAL, FP8_MIN_NORMAL_EXP, FP8_MANTISSA_BITS)  # fmt: skip


_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def rotary_store_kv(
    positions: torch.Tensor,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    cos_sin_cache: torch.Tensor,
    layer: LayerKV,
    slot_mapping: torch.Tensor,
) -> torch.Tensor:
    """Rotate query [num_tokens, num_heads, head_dim] and key [num_tokens, num_kv_heads, head_dim] by their
    positions [num_tokens] (int), and write the rotated key and value [num_tokens, num_kv_heads, head_dim] into
    `layer` at slot_mapping [num_tokens] (slot -1: padding, skipped). Returns the rotated query, a new tensor.

    Same contract and same bits as `rotary_store_kv_ref`. query, key and value may be strided views (slices of a fused
    qkv projection) as long as head_dim is contiguous; the key is not written back. No host synchronization.
    """
    check_store_kv_args(key, value, layer, slot_mapping)
    num_tokens, num_heads, head_dim = query.shape
    rot_dim = check_rotary_args(positions, query, key, cos_sin_cache)
    for t in (query, key):
        if t.dtype not in _DTYPES:
            raise ValueError(f"query and key must be float32, float16 or bfloat16, got {t.dtype}")
    query, key, value = (t if t.stride(-1) == 1 else t.contiguous() for t in (query, key, value))
    cos_sin_cache = cos_sin_cache.contiguous()
    q_out = torch.empty(query.shape, dtype=query.dtype, device=query.device)
    if num_tokens == 0:
        return q_out

    num_kv_heads = key.shape[1]
    k_scale, v_scale, k_scale_strides, v_scale_strides = scale_args(layer)
    block_h = triton.next_power_of_2(num_heads)
    dim_pad = triton.next_power_of_2(head_dim)

    _rotary_store_kv_kernel[(num_tokens, 2)](
        positions,
        query,
        key,
        value,
        q_out,
        cos_sin_cache,
        slot_mapping,
        layer.k_cache,
        layer.v_cache,
        k_scale,
        v_scale,
        query.stride(0),
        query.stride(1),
        key.stride(0),
        key.stride(1),
        value.stride(0),
        value.stride(1),
        q_out.stride(0),
        q_out.stride(1),
        cos_sin_cache.stride(0),
        *layer.k_cache.stride(),
        *layer.v_cache.stride(),
        *k_scale_strides,
        *v_scale_strides,
        num_heads,
        num_kv_heads,
        layer.block_size,
        HALF=rot_dim // 2,
        HEAD_DIM=head_dim,
        DIM_PAD=dim_pad,
        BLOCK_H=block_h,
        BLOCK_KH=triton.next_power_of_2(num_kv_heads),
        # The rotated key is already rounded to key.dtype: store_kv's conversion from that dtype.
        **quantize_constexprs(layer, key.dtype, value.dtype, key.device),
        # The query program's tile sets the size: ~8 float32 values per thread, as the rotary kernel.
        num_warps=max(1, min(8, block_h * dim_pad // 512)),
        **pdl.launch_options(query.device),
    )
    return q_out

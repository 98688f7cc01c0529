"""rotary + store_kv in one kernel, Triton. Same function as `rotary_store_kv_ref` (kernels/rotary_store_kv.py): the
query rotated (returned, out of place as kernels/triton_rotary.py does), the key rotated and, with the value,
quantized into the pool at the slots (as kernels/triton_store_kv.py does). Where the two kernels would write the
rotated key to memory and read it back, this one keeps it in registers.

Same bits as the two kernels in sequence:
- The rotated key is rounded to the key's dtype before it is quantized, as it is when the rotary kernel writes it.
  bf16 rounds to nearest even on the bits (`round_to_bf16`; the interpreter's float32 -> bf16 cast truncates), which
  is what a GPU's cast does, so the result does not depend on where it runs. The query is rounded the same way.
- The rotation is the same float32 arithmetic. x1 * cos - x2 * sin and x2 * cos + x1 * sin leave the compiler a
  choice: which product it fuses with the sum into an FMA. The rotary kernel, compiled by Triton 3.6 for sm_90,
  fuses x1 * cos in the first and x1 * sin in the second (read off its PTX); this kernel writes that choice out with
  `tl.fma`, so its bits do not hang on the compiler's. The interpreter's `tl.fma` rounds the product and the sum
  separately, as the torch reference does.
- Quantization is store_kv's own code (`store_at_slot`) on the same float32 values.

The rotation and the store (`rope_factors`, `rotated_rows`, `rotate_store_token`) are in kernels/triton_helpers.py:
the decode attention kernel does the same for its new token.

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
from kernels.triton_helpers import quantize_constexprs, rope_factors, rotate_store_token, rotated_rows, scale_args
from kvstore.formats import LayerKV

# Read by kernels/ops.py at each call: False sends rotary_store_kv to the rotary and store_kv kernels in sequence, an
# A/B in one process (bench/model_bench.py --sweep kernels.triton_rotary_store_kv.FUSED=0,1).
FUSED = True


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
    lo, c_lo, c_hi = rope_factors(positions_ptr, token, cache_ptr, stride_cache, offs_d, HALF)

    # Each branch names its own variables: Triton requires a name bound in both branches of an if to have one type.
    if role == 0:
        q_heads = tl.arange(0, BLOCK_H)
        q = rotated_rows(q_ptr + token * stride_qt, stride_qh, q_heads, num_heads, offs_d, lo, c_lo, c_hi,
                         2 * HALF, HALF, HEAD_DIM)  # fmt: skip
        q_mask = (q_heads < num_heads)[:, None] & (offs_d < HEAD_DIM)[None, :]
        q_out = q_out_ptr + token * stride_qot + q_heads[:, None] * stride_qoh + offs_d[None, :]
        tl.store(q_out, q.to(q_out_ptr.dtype.element_ty), mask=q_mask)
    else:
        # slot -1 marks a padding token: every store is masked off (as in store_kv).
        slot = tl.load(slot_mapping_ptr + token).to(tl.int64)
        rotate_store_token(k_ptr + token * stride_kt, v_ptr + token * stride_vt, stride_kh, stride_vh, slot,
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

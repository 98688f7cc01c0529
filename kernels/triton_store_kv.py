"""store_kv, Triton: quantize new K/V per the pool's formats and scatter them into their slots.

Same function as `store_kv_ref` (kernels/store_kv.py) and bit for bit the same result, for every format, on the
device the tensors live on. Getting there takes care, because neither Triton's casts nor torch's own arithmetic are the
same everywhere:

- int8: `round()` is half to even. Triton's float->int cast truncates and libdevice `rint` does not exist in the
  interpreter, so rounding uses the 1.5 * 2**23 trick (exact for |x| < 2**22, which holds: |x| <= 127).
- fp8: the value is first rounded to the e4m3 grid in float32 (round half to even, subnormals included), after which
  the cast is exact. This does not depend on how a backend (or the interpreter, whose fp8 cast does not round to
  nearest even) implements float32 -> fp8, and it works for e4m3fn (NVIDIA) and e4m3fnuz (ROCm) alike.
- bf16 from a wider input: rounded to nearest even on the bits (the interpreter's float32 -> bf16 cast truncates).
- The scale: `quantize` computes `amax / qmax`. On the CPU torch divides; on CUDA/ROCm torch turns a division by a
  Python scalar into a multiplication by its float32 reciprocal (ATen's div_true_kernel_cuda), which differs in the
  last bit for about 4% of values (for qmax 127). The kernel does what torch does on the tensors' device.
- Divisions use `tl.div_rn` (IEEE); Triton's `/` on float32 may lower to an approximate division on GPUs.

The quantization itself (`store_at_slot`, `quantize_constexprs`) is in kernels/triton_helpers.py: the fused
rotary_store_kv and decode attention kernels store with the same code.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kernels import pdl
from kernels.store_kv import check_store_kv_args
from kernels.triton_helpers import quantize_constexprs, scale_args, store_at_slot
from kvstore.formats import LayerKV


@triton.jit
def _store_kv_kernel(
    key_ptr,  # [num_tokens, num_kv_heads, head_dim]
    value_ptr,
    slot_mapping_ptr,  # [num_tokens]
    k_cache_ptr,  # [num_blocks, block_size, num_kv_heads, head_dim]
    v_cache_ptr,
    k_scale_ptr,  # [num_blocks, block_size, num_kv_heads] float32 (any tensor if K is unscaled)
    v_scale_ptr,
    block_size,
    num_kv_heads,
    head_dim,
    stride_key_t,
    stride_key_h,
    stride_key_d,
    stride_value_t,
    stride_value_h,
    stride_value_d,
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
    K_MODE: tl.constexpr,
    V_MODE: tl.constexpr,
    K_QMAX: tl.constexpr,
    V_QMAX: tl.constexpr,
    K_INV_QMAX: tl.constexpr,
    V_INV_QMAX: tl.constexpr,
    RECIPROCAL: tl.constexpr,
    FP8_MIN_NORMAL_EXP: tl.constexpr,
    FP8_MANTISSA_BITS: tl.constexpr,
    HEADS_PAD: tl.constexpr,
    DIM_PAD: tl.constexpr,
    PDL: tl.constexpr,
):
    # One program per token: all its kv heads as one [HEADS_PAD, DIM_PAD] tile, K and V.
    pdl.enter(PDL)  # nothing is read before the previous kernel is done; the next kernels may launch (kernels/pdl.py)
    token = tl.program_id(0).to(tl.int64)
    slot = tl.load(slot_mapping_ptr + token).to(tl.int64)
    # slot -1 marks a padding token: every load and store below is masked off (no early return: simpler everywhere).
    valid = slot >= 0
    block = slot // block_size
    offset = slot % block_size

    offs_h = tl.arange(0, HEADS_PAD)
    offs_d = tl.arange(0, DIM_PAD)
    head_mask = (offs_h < num_kv_heads) & valid
    mask = head_mask[:, None] & (offs_d < head_dim)[None, :]

    key = tl.load(
        key_ptr + token * stride_key_t + offs_h[:, None] * stride_key_h + offs_d[None, :] * stride_key_d,
        mask=mask,
        other=0.0,
    ).to(tl.float32)
    store_at_slot(key, mask, head_mask, k_cache_ptr, k_scale_ptr, block, offset, offs_h, offs_d, stride_kc_b,
                  stride_kc_s, stride_kc_h, stride_kc_d, stride_ks_b, stride_ks_s, stride_ks_h, K_MODE, K_QMAX,
                  K_INV_QMAX, RECIPROCAL, FP8_MIN_NORMAL_EXP, FP8_MANTISSA_BITS)  # fmt: skip

    value = tl.load(
        value_ptr + token * stride_value_t + offs_h[:, None] * stride_value_h + offs_d[None, :] * stride_value_d,
        mask=mask,
        other=0.0,
    ).to(tl.float32)
    store_at_slot(value, mask, head_mask, v_cache_ptr, v_scale_ptr, block, offset, offs_h, offs_d, stride_vc_b,
                  stride_vc_s, stride_vc_h, stride_vc_d, stride_vs_b, stride_vs_s, stride_vs_h, V_MODE, V_QMAX,
                  V_INV_QMAX, RECIPROCAL, FP8_MIN_NORMAL_EXP, FP8_MANTISSA_BITS)  # fmt: skip


def store_kv(key: torch.Tensor, value: torch.Tensor, layer: LayerKV, slot_mapping: torch.Tensor) -> None:
    """Write key/value [num_tokens, num_kv_heads, head_dim] into `layer` at slot_mapping [num_tokens] int64.

    slot = block_id * block_size + offset; slot -1 marks a padding token (as in vLLM) and is skipped.
    Same contract and same bits as `store_kv_ref`. No host synchronization: safe inside a CUDA graph.
    """
    check_store_kv_args(key, value, layer, slot_mapping)
    num_tokens, num_kv_heads, head_dim = key.shape
    if num_tokens == 0:
        return

    k_scale, v_scale, k_scale_strides, v_scale_strides = scale_args(layer)

    _store_kv_kernel[(num_tokens,)](
        key,
        value,
        slot_mapping,
        layer.k_cache,
        layer.v_cache,
        k_scale,
        v_scale,
        layer.block_size,
        num_kv_heads,
        head_dim,
        *key.stride(),
        *value.stride(),
        *layer.k_cache.stride(),
        *layer.v_cache.stride(),
        *k_scale_strides,
        *v_scale_strides,
        **quantize_constexprs(layer, key.dtype, value.dtype, key.device),
        HEADS_PAD=triton.next_power_of_2(num_kv_heads),
        DIM_PAD=triton.next_power_of_2(head_dim),
        **pdl.launch_options(key.device),
    )

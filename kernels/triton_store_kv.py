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
"""

from __future__ import annotations

import functools
import math

import torch
import triton
import triton.language as tl

from kernels import pdl
from kernels.store_kv import check_store_kv_args
from kvstore.formats import AMAX_FLOOR, KVFormat
from kvstore.pool import LayerKV

# How a row is converted, per K and V (a constexpr of the kernel).
_MODE_CAST = tl.constexpr(0)  # unscaled, a plain cast (exact, or to nearest even everywhere: fp32, fp16, bf16->bf16)
_MODE_BF16 = tl.constexpr(1)  # unscaled bf16 from a wider input: round to nearest even on the bits, then an exact cast
_MODE_INT8 = tl.constexpr(2)
_MODE_FP8 = tl.constexpr(3)

# Adding and subtracting 1.5 * 2**23 rounds a float32 with |x| < 2**22 to an integer, half to even (the FPU's mode).
_RINT_MAGIC = tl.constexpr(12582912.0)
_AMAX_FLOOR = tl.constexpr(AMAX_FLOOR)


@triton.jit
def _rint(x):
    # No fast-math reassociation in Triton, so (x + M) - M is not folded away.
    return (x + _RINT_MAGIC) - _RINT_MAGIC


@triton.jit
def _round_to_fp8_grid(x, MIN_NORMAL_EXP: tl.constexpr, MANTISSA_BITS: tl.constexpr):
    """x (float32, |x| <= the format's max) rounded half to even onto the grid of an fp8 format; stays float32."""
    bits = x.to(tl.int32, bitcast=True)
    # floor(log2|x|) for normal float32 values; -127 for zero (and float32 denormals, far below any fp8 value).
    exponent = ((bits >> 23) & 0xFF) - 127
    # Below the smallest normal, the fp8 subnormals are spaced like the smallest normal binade.
    ulp_exponent = tl.maximum(exponent, MIN_NORMAL_EXP) - MANTISSA_BITS
    # 2**ulp_exponent and its inverse, built from the bits: both are exact powers of two.
    ulp = ((ulp_exponent + 127) << 23).to(tl.float32, bitcast=True)
    inv_ulp = ((127 - ulp_exponent) << 23).to(tl.float32, bitcast=True)
    # |x| * inv_ulp is exact and < 2**(MANTISSA_BITS + 1), well inside _rint's range.
    magnitude = _rint(tl.abs(x) * inv_ulp) * ulp
    # The sign goes back on by its bit: a negative value that rounds to zero is -0.0 (0x80), as torch's cast gives.
    return (magnitude.to(tl.int32, bitcast=True) | (bits & -0x80000000)).to(tl.float32, bitcast=True)


@triton.jit
def _round_to_bf16(x):
    """float32 -> the nearest bf16 value (ties to even), still as float32 so the later cast is exact."""
    bits = x.to(tl.uint32, bitcast=True)
    bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
    return bits.to(tl.float32, bitcast=True)


@triton.jit
def _quantize_store(
    x,  # [HEADS_PAD, DIM_PAD] float32, 0 where masked
    mask,  # [HEADS_PAD, DIM_PAD]
    head_mask,  # [HEADS_PAD]
    data_ptrs,  # [HEADS_PAD, DIM_PAD] pointers into the cache
    scale_ptrs,  # [HEADS_PAD] pointers into the scale cache (unused for unscaled modes)
    MODE: tl.constexpr,
    QMAX: tl.constexpr,
    INV_QMAX: tl.constexpr,
    RECIPROCAL: tl.constexpr,
    FP8_MIN_NORMAL_EXP: tl.constexpr,
    FP8_MANTISSA_BITS: tl.constexpr,
):
    out_ty = data_ptrs.dtype.element_ty
    if MODE == _MODE_CAST:
        tl.store(data_ptrs, x.to(out_ty), mask=mask)
    elif MODE == _MODE_BF16:
        tl.store(data_ptrs, _round_to_bf16(x).to(out_ty), mask=mask)
    else:
        # [HEADS_PAD]
        amax = tl.maximum(tl.max(tl.abs(x), axis=1), _AMAX_FLOOR)
        if RECIPROCAL:
            scale = amax * INV_QMAX
        else:
            scale = tl.div_rn(amax, QMAX)
        # [HEADS_PAD, DIM_PAD]
        scaled = tl.div_rn(x, scale[:, None])
        if MODE == _MODE_INT8:
            data = tl.minimum(tl.maximum(_rint(scaled), -QMAX), QMAX).to(out_ty)
        else:
            clamped = tl.minimum(tl.maximum(scaled, -QMAX), QMAX)
            data = _round_to_fp8_grid(clamped, FP8_MIN_NORMAL_EXP, FP8_MANTISSA_BITS).to(out_ty)
        tl.store(data_ptrs, data, mask=mask)
        tl.store(scale_ptrs, scale, mask=head_mask)


@triton.jit
def _store_at_slot(
    x,  # [HEADS_PAD, DIM_PAD] float32: one token's K or V, 0 where masked
    mask,  # [HEADS_PAD, DIM_PAD]
    head_mask,  # [HEADS_PAD]
    cache_ptr,  # [num_blocks, block_size, num_kv_heads, head_dim]
    scale_ptr,  # [num_blocks, block_size, num_kv_heads] float32 (unused for unscaled modes)
    block,
    offset,  # the token's slot: block id and offset in it
    heads,  # [HEADS_PAD]
    offs_d,  # [DIM_PAD]
    stride_b,
    stride_s,
    stride_h,
    stride_d,
    stride_sb,
    stride_ss,
    stride_sh,
    MODE: tl.constexpr,
    QMAX: tl.constexpr,
    INV_QMAX: tl.constexpr,
    RECIPROCAL: tl.constexpr,
    FP8_MIN_NORMAL_EXP: tl.constexpr,
    FP8_MANTISSA_BITS: tl.constexpr,
):
    """Quantize one token's K or V and write it (and its scales) at its slot."""
    data_ptrs = (
        cache_ptr + block * stride_b + offset * stride_s + heads[:, None] * stride_h + offs_d[None, :] * stride_d
    )
    scale_ptrs = scale_ptr + block * stride_sb + offset * stride_ss + heads * stride_sh
    _quantize_store(x, mask, head_mask, data_ptrs, scale_ptrs, MODE, QMAX, INV_QMAX, RECIPROCAL, FP8_MIN_NORMAL_EXP,
                    FP8_MANTISSA_BITS)  # fmt: skip


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
    _store_at_slot(key, mask, head_mask, k_cache_ptr, k_scale_ptr, block, offset, offs_h, offs_d, stride_kc_b,
                   stride_kc_s, stride_kc_h, stride_kc_d, stride_ks_b, stride_ks_s, stride_ks_h, K_MODE, K_QMAX,
                   K_INV_QMAX, RECIPROCAL, FP8_MIN_NORMAL_EXP, FP8_MANTISSA_BITS)  # fmt: skip

    value = tl.load(
        value_ptr + token * stride_value_t + offs_h[:, None] * stride_value_h + offs_d[None, :] * stride_value_d,
        mask=mask,
        other=0.0,
    ).to(tl.float32)
    _store_at_slot(value, mask, head_mask, v_cache_ptr, v_scale_ptr, block, offset, offs_h, offs_d, stride_vc_b,
                   stride_vc_s, stride_vc_h, stride_vc_d, stride_vs_b, stride_vs_s, stride_vs_h, V_MODE, V_QMAX,
                   V_INV_QMAX, RECIPROCAL, FP8_MIN_NORMAL_EXP, FP8_MANTISSA_BITS)  # fmt: skip


def _mode(fmt: KVFormat, input_dtype: torch.dtype) -> int:
    if fmt is KVFormat.INT8:
        return _MODE_INT8.value
    if fmt is KVFormat.FP8:
        return _MODE_FP8.value
    if fmt is KVFormat.BF16 and input_dtype != torch.bfloat16:
        return _MODE_BF16.value
    return _MODE_CAST.value


@functools.cache  # every launch asks (quantize_constexprs): two torch scalars a call otherwise
def _inv_qmax(fmt: KVFormat) -> float:
    """float32(1 / qmax), computed as torch does on CUDA (a float32 division), as a Python float that is exact."""
    if not fmt.has_scale:
        return 1.0
    return float(torch.tensor(1.0, dtype=torch.float32) / torch.tensor(fmt.qmax, dtype=torch.float32))


def _fp8_grid(dtype: torch.dtype) -> tuple[int, int]:
    """(exponent of the smallest normal, mantissa bits) of an fp8 dtype: (-6, 3) for e4m3fn, (-7, 3) for e4m3fnuz."""
    finfo = torch.finfo(dtype)
    return round(math.log2(finfo.smallest_normal)), round(-math.log2(finfo.eps))


def scale_args(layer: LayerKV) -> tuple:
    """(k_scale, v_scale, k_scale strides, v_scale strides) to launch with. Unscaled formats have no scale tensor;
    the kernel never touches the pointer then, any tensor will do."""
    k_scale = layer.k_scale if layer.k_scale is not None else layer.k_cache
    v_scale = layer.v_scale if layer.v_scale is not None else layer.v_cache
    k_scale_strides = layer.k_scale.stride() if layer.k_scale is not None else (0, 0, 0)
    v_scale_strides = layer.v_scale.stride() if layer.v_scale is not None else (0, 0, 0)
    return k_scale, v_scale, k_scale_strides, v_scale_strides


def quantize_constexprs(layer: LayerKV, key_dtype: torch.dtype, value_dtype: torch.dtype, device) -> dict:
    """The K_*/V_* quantization constexprs of a kernel that stores K and V with `_store_at_slot`."""
    fp8_min_normal_exp, fp8_mantissa_bits = _fp8_grid(KVFormat.FP8.storage_dtype)
    return {
        "K_MODE": _mode(layer.k_format, key_dtype),
        "V_MODE": _mode(layer.v_format, value_dtype),
        "K_QMAX": layer.k_format.qmax if layer.k_format.has_scale else 1.0,
        "V_QMAX": layer.v_format.qmax if layer.v_format.has_scale else 1.0,
        "K_INV_QMAX": _inv_qmax(layer.k_format),
        "V_INV_QMAX": _inv_qmax(layer.v_format),
        # What torch's `amax / qmax` does on this device (see the module docstring).
        "RECIPROCAL": device.type != "cpu",
        "FP8_MIN_NORMAL_EXP": fp8_min_normal_exp,
        "FP8_MANTISSA_BITS": fp8_mantissa_bits,
    }


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

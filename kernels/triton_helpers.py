"""Triton helpers shared by more than one kernel: K/V quantization into the pool (store_kv's code, also run by the
fused rotary_store_kv and decode attention kernels), the rotary rotation those two share, and the K/V tile conversion
for a dot. Device functions are `@triton.jit` and inlined into the kernels that call them; the host functions give
the launch arguments that go with them.

The quantization is bit for bit `kvstore.formats.quantize` (kernels/triton_store_kv.py's docstring says how), the
rotation bit for bit the rotary kernel compiled for sm_90 (kernels/triton_rotary_store_kv.py's docstring).
"""

from __future__ import annotations

import functools
import math

import torch
import triton
import triton.language as tl

from kvstore.formats import AMAX_FLOOR, KVFormat, LayerKV

# How a row is converted, per K and V (a constexpr of the kernel).
_MODE_CAST = tl.constexpr(0)  # unscaled, a plain cast (exact, or to nearest even everywhere: fp32, fp16, bf16->bf16)
_MODE_BF16 = tl.constexpr(1)  # unscaled bf16 from a wider input: round to nearest even on the bits, then an exact cast
_MODE_INT8 = tl.constexpr(2)
_MODE_FP8 = tl.constexpr(3)

# Adding and subtracting 1.5 * 2**23 rounds a float32 with |x| < 2**22 to an integer, half to even (the FPU's mode).
_RINT_MAGIC = tl.constexpr(12582912.0)
_AMAX_FLOOR = tl.constexpr(AMAX_FLOOR)


# ---------------------------------------------------------------------------------------------------------------------
# K/V quantization (store_kv)


@triton.jit
def _rint(x):
    """float32 x (any shape, |x| < 2**22) rounded to an integer value, half to even; stays float32."""
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
def round_to_bf16(x):
    """float32 x (any shape) -> the nearest bf16 value (ties to even), still as float32 so the later cast is exact.
    On the bits: the interpreter's float32 -> bf16 cast truncates, a GPU's rounds to nearest even."""
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
    """Convert the [HEADS_PAD, DIM_PAD] rows per MODE and store them at data_ptrs; the scaled modes (int8, fp8) also
    store one scale per head (amax / qmax) at scale_ptrs."""
    out_ty = data_ptrs.dtype.element_ty
    if MODE == _MODE_CAST:
        tl.store(data_ptrs, x.to(out_ty), mask=mask)
    elif MODE == _MODE_BF16:
        tl.store(data_ptrs, round_to_bf16(x).to(out_ty), mask=mask)
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
            data = _round_to_fp8_grid(clamped, FP8_MIN_NORMAL_EXP, FP8_MANTISSA_BITS)
            if out_ty == tl.float8e4b8:
                # e4m3fnuz has no -0 (its byte 0x80 is NaN): torch stores what rounds to -0 as 0x00, a plain cast
                # (Triton's interpreter at least) as 0x80. -0.0 + 0.0 = +0.0; every other value is unchanged.
                data = data + 0.0
            data = data.to(out_ty)
        tl.store(data_ptrs, data, mask=mask)
        tl.store(scale_ptrs, scale, mask=head_mask)


@triton.jit
def store_at_slot(
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
    """Quantize one token's K or V [HEADS_PAD, DIM_PAD] (the constexprs: `quantize_constexprs`) and write it, and
    its scales [HEADS_PAD], at its slot (block, offset) of the pool."""
    data_ptrs = (
        cache_ptr + block * stride_b + offset * stride_s + heads[:, None] * stride_h + offs_d[None, :] * stride_d
    )
    scale_ptrs = scale_ptr + block * stride_sb + offset * stride_ss + heads * stride_sh
    _quantize_store(x, mask, head_mask, data_ptrs, scale_ptrs, MODE, QMAX, INV_QMAX, RECIPROCAL, FP8_MIN_NORMAL_EXP,
                    FP8_MANTISSA_BITS)  # fmt: skip


def _mode(fmt: KVFormat, input_dtype: torch.dtype) -> int:
    """The MODE constexpr that stores input_dtype values in format fmt."""
    if fmt is KVFormat.INT8:
        return _MODE_INT8.value
    if fmt is KVFormat.FP8:
        return _MODE_FP8.value
    if fmt is KVFormat.BF16 and input_dtype != torch.bfloat16:
        return _MODE_BF16.value
    return _MODE_CAST.value


@functools.cache  # every launch asks (quantize_constexprs): two torch scalars a call otherwise
def _inv_qmax(qmax: float) -> float:
    """float32(1 / qmax), computed as torch does on CUDA (a float32 division), as a Python float that is exact."""
    return float(torch.tensor(1.0, dtype=torch.float32) / torch.tensor(qmax, dtype=torch.float32))


def _qmax(fmt: KVFormat, fp8: torch.dtype) -> float:
    """The grid's largest magnitude of a scaled format (fp8: of the flavour `fp8`), 1.0 for an unscaled one."""
    if fmt is KVFormat.FP8:
        return float(torch.finfo(fp8).max)
    return fmt.qmax if fmt.has_scale else 1.0


def _layer_fp8(layer: LayerKV) -> torch.dtype | None:
    """The e4m3 flavour of the layer's fp8 K or V cache (a pool may be either, `KVPool.allocate`'s fp8), or None."""
    for fmt, cache in ((layer.k_format, layer.k_cache), (layer.v_format, layer.v_cache)):
        if fmt is KVFormat.FP8:
            return cache.dtype
    return None


def _fp8_grid(dtype: torch.dtype) -> tuple[int, int]:
    """(exponent of the smallest normal, mantissa bits) of an fp8 dtype: (-6, 3) for e4m3fn, (-7, 3) for e4m3fnuz."""
    finfo = torch.finfo(dtype)
    return round(math.log2(finfo.smallest_normal)), round(-math.log2(finfo.eps))


def scale_args(layer: LayerKV) -> tuple:
    """(k_scale, v_scale, k_scale strides, v_scale strides) to launch with: the layer's scale tensors
    [num_blocks, block_size, num_kv_heads] float32 and their 3 strides each. Unscaled formats have no scale tensor;
    the kernel never touches the pointer then, any tensor will do (the cache), with strides (0, 0, 0)."""
    k_scale = layer.k_scale if layer.k_scale is not None else layer.k_cache
    v_scale = layer.v_scale if layer.v_scale is not None else layer.v_cache
    k_scale_strides = layer.k_scale.stride() if layer.k_scale is not None else (0, 0, 0)
    v_scale_strides = layer.v_scale.stride() if layer.v_scale is not None else (0, 0, 0)
    return k_scale, v_scale, k_scale_strides, v_scale_strides


def quantize_constexprs(layer: LayerKV, key_dtype: torch.dtype, value_dtype: torch.dtype, device,
                        fp8: torch.dtype | None = None) -> dict:  # fmt: skip
    """The K_*/V_* quantization constexprs of a kernel that stores K and V with `store_at_slot`: K_MODE, V_MODE,
    K_QMAX, V_QMAX, K_INV_QMAX, V_INV_QMAX, RECIPROCAL, FP8_MIN_NORMAL_EXP, FP8_MANTISSA_BITS, for the layer's K and V
    formats and the dtypes of the key and value rows stored, on `device` (torch.device). fp8: the e4m3 flavour an fp8
    pool stores, default the layer's own (its fp8 cache tensor's dtype), else this platform's
    (`kvstore.formats.fp8_dtype`: e4m3fnuz on gfx942); the AMD compile check (tests/kernels/compile_gfx942.py) passes
    its target's from a host without ROCm."""
    fp8 = fp8 or _layer_fp8(layer) or KVFormat.FP8.storage_dtype
    fp8_min_normal_exp, fp8_mantissa_bits = _fp8_grid(fp8)
    k_qmax, v_qmax = _qmax(layer.k_format, fp8), _qmax(layer.v_format, fp8)
    return {
        "K_MODE": _mode(layer.k_format, key_dtype),
        "V_MODE": _mode(layer.v_format, value_dtype),
        "K_QMAX": k_qmax,
        "V_QMAX": v_qmax,
        "K_INV_QMAX": _inv_qmax(k_qmax),
        "V_INV_QMAX": _inv_qmax(v_qmax),
        # What torch's `amax / qmax` does on this device (kernels/triton_store_kv.py's docstring).
        "RECIPROCAL": device.type != "cpu",
        "FP8_MIN_NORMAL_EXP": fp8_min_normal_exp,
        "FP8_MANTISSA_BITS": fp8_mantissa_bits,
    }


# ---------------------------------------------------------------------------------------------------------------------
# rotary (rotary_store_kv, decode attention with the new token)


@triton.jit
def _round_to_element_of(x, ptr):
    """float32 x (any shape) rounded to nearest even in ptr's element type (bf16, fp16 or float32), still as float32:
    the later cast to that type is exact."""
    if ptr.dtype.element_ty == tl.bfloat16:
        return round_to_bf16(x)
    elif ptr.dtype.element_ty == tl.float16:
        return x.to(tl.float16).to(tl.float32)
    else:
        return x


@triton.jit
def rotated_rows(
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
def rope_factors(positions_ptr, token, cache_ptr, stride_cache, offs_d, HALF: tl.constexpr):
    """(lo, c_lo, c_hi), each [DIM_PAD], of `rotated_rows` for the token at positions[token]: its cos/sin from the
    cache [max_positions, 2 * HALF] laid out over a head's dims (frequency d mod HALF)."""
    position = tl.load(positions_ptr + token).to(tl.int64)
    first = offs_d < HALF
    second = (offs_d >= HALF) & (offs_d < 2 * HALF)
    lo = tl.where(second, offs_d - HALF, offs_d)
    cache_row = cache_ptr + position * stride_cache
    cos = tl.load(cache_row + lo, mask=first | second, other=0.0).to(tl.float32)
    sin = tl.load(cache_row + HALF + lo, mask=first | second, other=0.0).to(tl.float32)
    return lo, tl.where(first, cos, sin), tl.where(first, -sin, cos)


@triton.jit
def rotate_store_token(
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
    """One token's key rotated and, with its value, quantized into the pool at `slot` (kv_heads of it): [BLOCK_KH,
    DIM_PAD] rows each, the rotation's (lo, c_lo, c_hi) from `rope_factors`."""
    valid = slot >= 0
    block = slot // block_size
    offset = slot % block_size
    head_mask = (kv_heads < num_kv_heads) & valid
    mask = head_mask[:, None] & (offs_d < HEAD_DIM)[None, :]
    # The value's load is issued before the key's arithmetic: both are in flight together.
    value = tl.load(v_row_ptr + kv_heads[:, None] * stride_vh + offs_d[None, :], mask=mask, other=0.0).to(tl.float32)
    # A padding token's key is rotated too, but nothing of it is stored: every store is masked by `valid`.
    key = rotated_rows(k_row_ptr, stride_kh, kv_heads, num_kv_heads, offs_d, lo, c_lo, c_hi, 2 * HALF, HALF,
                       HEAD_DIM)  # fmt: skip
    store_at_slot(key, mask, head_mask, k_cache_ptr, k_scale_ptr, block, offset, kv_heads, offs_d, stride_kc_b,
                  stride_kc_s, stride_kc_h, stride_kc_d, stride_ks_b, stride_ks_s, stride_ks_h, K_MODE, K_QMAX,
                  K_INV_QMAX, RECIPROCAL, FP8_MIN_NORMAL_EXP, FP8_MANTISSA_BITS)  # fmt: skip
    store_at_slot(value, mask, head_mask, v_cache_ptr, v_scale_ptr, block, offset, kv_heads, offs_d, stride_vc_b,
                  stride_vc_s, stride_vc_h, stride_vc_d, stride_vs_b, stride_vs_s, stride_vs_h, V_MODE, V_QMAX,
                  V_INV_QMAX, RECIPROCAL, FP8_MIN_NORMAL_EXP, FP8_MANTISSA_BITS)  # fmt: skip


# ---------------------------------------------------------------------------------------------------------------------
# K/V tiles into a dot (decode attention; compiled on its own by tests/kernels/compile_sm90.py)


@triton.jit
def to_dot(x, DOT_DTYPE: tl.constexpr, CONVERT: tl.constexpr, BIASED: tl.constexpr = False):
    """A loaded K/V tile [BLOCK_N, HEAD_DIM_PAD] as the dot's input dtype; exact for int8 and e4m3.

    int8 -> fp16 without an integer-to-float conversion: x + 128 in 0..255 placed in the mantissa of 1024.0 (bits
    0x6400) is the fp16 1024 + x + 128 exactly; subtracting 1152 leaves x. CONVERT picks how:
    0: the plain cast (one I2F per element, a slow instruction); 1: the trick in Triton integer ops (portable: ROCm,
    the interpreter); 2: the trick in PTX on four packed bytes at once (CUDA only): one xor and two byte permutes per
    four values, then two packed half subtractions. BIASED (int8 -> fp16 with CONVERT 1 or 2): return x + 1152 and let
    the caller take 1152 * sum(other operand) off the dot's float32 result, a few values a tile instead of one
    subtraction per two K/V values.
    """
    # One return at the end: Triton's frontend still generates the statements after a `return` under a compile-time
    # `if`, so an early return made every non-int8 tile go through the byte tricks below and fail to compile.
    if x.dtype != tl.int8 or DOT_DTYPE != tl.float16 or CONVERT == 0:
        out = x.to(DOT_DTYPE)
    else:
        if CONVERT == 2:
            # (H200, batch 32 x 4k: 0.63 of copy bandwidth against 0.52 with 1 and 0.49 with 0)
            biased = tl.inline_asm_elementwise(
                asm="""
                {
                .reg .b32 t, e;
                xor.b32 t, $2, 0x80808080;
                mov.b32 e, 0x64646464;
                prmt.b32 $0, t, e, 0x5150;
                prmt.b32 $1, t, e, 0x5352;
                }
                """,
                constraints="=r,=r,r",
                args=[x],
                dtype=tl.float16,
                is_pure=True,
                pack=4,
            )
        else:
            biased = ((x.to(tl.uint8, bitcast=True) ^ 0x80).to(tl.uint16) | 0x6400).to(tl.float16, bitcast=True)
        out = biased if BIASED else biased - 1152.0
    return out

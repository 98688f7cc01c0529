"""KV formats: parsing --kv-dtype, sizes, and the quantization round-trip bounds."""

from __future__ import annotations

import pytest
import torch

from kvstore.formats import (
    AMAX_FLOOR,
    KVFormat,
    KVSpec,
    bytes_per_token,
    dequantize,
    fp8_dtype,
    fp8_dtype_for_arch,
    parse_kv_dtype,
    quantize,
)


@pytest.mark.parametrize(
    ("text", "model_dtype", "k", "v"),
    [
        ("auto", torch.bfloat16, KVFormat.BF16, KVFormat.BF16),
        ("auto", torch.float16, KVFormat.FP16, KVFormat.FP16),
        ("auto", torch.float32, KVFormat.FP32, KVFormat.FP32),
        ("int8", torch.bfloat16, KVFormat.INT8, KVFormat.INT8),
        ("fp8", torch.bfloat16, KVFormat.FP8, KVFormat.FP8),
        ("bf16", torch.float32, KVFormat.BF16, KVFormat.BF16),
        (" INT8 ", torch.bfloat16, KVFormat.INT8, KVFormat.INT8),
        ("k=int8,v=bf16", torch.bfloat16, KVFormat.INT8, KVFormat.BF16),
        ("v=fp8, k=auto", torch.float16, KVFormat.FP16, KVFormat.FP8),
    ],
)
def test_parse_kv_dtype(text: str, model_dtype: torch.dtype, k: KVFormat, v: KVFormat) -> None:
    spec = parse_kv_dtype(text, model_dtype)
    assert spec == KVSpec(k=k, v=v)
    # str() round-trips
    assert parse_kv_dtype(str(spec), model_dtype) == spec


def test_spec_str() -> None:
    assert str(KVSpec(KVFormat.INT8, KVFormat.INT8)) == "int8"
    assert str(KVSpec(KVFormat.INT8, KVFormat.BF16)) == "k=int8,v=bf16"


@pytest.mark.parametrize("text", ["", "int4", "k=int8", "k=int8,v=", "k=int8,k=bf16", "x=int8,v=bf16", "int8,bf16"])
def test_parse_kv_dtype_rejects(text: str) -> None:
    with pytest.raises(ValueError, match="kv dtype"):
        parse_kv_dtype(text, torch.bfloat16)


def test_auto_needs_a_stored_dtype() -> None:
    with pytest.raises(ValueError):
        parse_kv_dtype("auto", torch.int8)


def test_storage_dtypes_and_scales() -> None:
    assert KVFormat.BF16.storage_dtype == torch.bfloat16
    assert KVFormat.INT8.storage_dtype == torch.int8
    assert KVFormat.FP8.storage_dtype == fp8_dtype()
    # Not on ROCm in CPU tests: the OCP flavour.
    assert fp8_dtype() == (torch.float8_e4m3fnuz if torch.version.hip else torch.float8_e4m3fn)
    assert [f.has_scale for f in KVFormat] == [False, False, False, True, True]


def test_bytes_per_token() -> None:
    # bf16 K and V, 2 layers, 3 heads, head_dim 64: 2 * 2 * 3 * 64 * 2 bytes
    assert bytes_per_token(KVSpec(KVFormat.BF16, KVFormat.BF16), 2, 3, 64) == 2 * 2 * 3 * 64 * 2
    # int8 K with a float32 scale per head, bf16 V
    assert bytes_per_token(KVSpec(KVFormat.INT8, KVFormat.BF16), 2, 3, 64) == 2 * 3 * ((64 + 4) + 64 * 2)
    assert bytes_per_token(KVSpec(KVFormat.FP8, KVFormat.FP8), 1, 1, 40) == 2 * (40 + 4)


def _sample(shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    # Rows of very different magnitudes, as K often has (outlier heads).
    x = torch.randn(shape, generator=g) * torch.logspace(-3, 2, shape[-2])[:, None]
    return x.to(dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("head_dim", [40, 64])
def test_int8_round_trip(dtype: torch.dtype, head_dim: int) -> None:
    x = _sample((7, 5, head_dim), dtype)
    data, scale = quantize(x, KVFormat.INT8)
    assert data.dtype == torch.int8 and data.shape == x.shape
    assert scale is not None and scale.dtype == torch.float32 and scale.shape == x.shape[:-1]
    assert data.abs().max() <= 127
    amax = x.float().abs().amax(-1)
    torch.testing.assert_close(scale, amax / 127)
    back = dequantize(data, scale, KVFormat.INT8, torch.float32)
    err = (back - x.float()).abs().amax(-1)
    # Rounding to the nearest grid point: at most half a step, amax / 254, well inside the amax / 127 bound.
    assert (err <= amax / 127).all()
    assert (err <= amax / 254 * (1 + 1e-4)).all()
    # The largest element of each row is exactly representable (it maps to +-127).
    assert (data.abs().amax(-1) == 127).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fp8_round_trip(dtype: torch.dtype) -> None:
    x = _sample((9, 3, 64), dtype)
    data, scale = quantize(x, KVFormat.FP8)
    assert data.dtype == fp8_dtype() and scale is not None
    qmax = torch.finfo(fp8_dtype()).max
    amax = x.float().abs().amax(-1)
    torch.testing.assert_close(scale, amax / qmax)
    back = dequantize(data, scale, KVFormat.FP8, torch.float32)
    err = (back - x.float()).abs()
    # e4m3 keeps 3 mantissa bits: relative error <= 2^-4 for normals; below the smallest normal (2^-6 of the scale)
    # the subnormal step is 2^-9 of the scale, so the absolute error there is <= 2^-10 of the scale.
    bound = x.float().abs() * 2**-4 + scale[..., None] * 2**-10
    assert (err <= bound * (1 + 1e-4)).all()
    # and overall well within amax / 16 per token-head
    assert (err.amax(-1) <= amax / 16 * (1 + 1e-4)).all()


@pytest.mark.parametrize("fmt", [KVFormat.INT8, KVFormat.FP8])
def test_zero_rows_quantize_to_zero(fmt: KVFormat) -> None:
    x = torch.zeros(4, 2, 8)
    x[1, 1] = torch.linspace(-1, 1, 8)
    data, scale = quantize(x, fmt)
    assert scale is not None
    assert torch.isfinite(scale).all() and (scale > 0).all()
    assert scale[0, 0] == pytest.approx(AMAX_FLOOR / fmt.qmax)
    back = dequantize(data, scale, fmt, torch.float32)
    assert (back[0] == 0).all() and torch.isfinite(back).all()


@pytest.mark.parametrize("fmt", [KVFormat.BF16, KVFormat.FP16, KVFormat.FP32])
def test_unscaled_formats_are_casts(fmt: KVFormat) -> None:
    x = torch.randn(3, 2, 40)
    data, scale = quantize(x, fmt)
    assert scale is None and data.dtype == fmt.storage_dtype
    assert torch.equal(dequantize(data, None, fmt, torch.float32), x.to(fmt.storage_dtype).float())


def test_fp8_flavour_by_architecture() -> None:
    """gfx942 (MI300X) stores e4m3fnuz (max 240); gfx950 (MI350X), NVIDIA and the CPU OCP e4m3fn (max 448)."""
    assert fp8_dtype_for_arch("gfx942:sramecc+:xnack-") == torch.float8_e4m3fnuz
    assert fp8_dtype_for_arch("gfx942") == torch.float8_e4m3fnuz
    assert fp8_dtype_for_arch("gfx950:sramecc+:xnack-") == torch.float8_e4m3fn
    assert fp8_dtype_for_arch(None) == torch.float8_e4m3fn


@pytest.mark.parametrize("flavour", [torch.float8_e4m3fn, torch.float8_e4m3fnuz])
def test_fp8_quantize_into_either_flavour(flavour: torch.dtype) -> None:
    """quantize's dtype picks the flavour and its max (the pool's cache dtype: `KVPool.allocate(..., fp8=)`)."""
    x = torch.randn(5, 3, 40, generator=torch.Generator().manual_seed(3)) * 7
    data, scale = quantize(x, KVFormat.FP8, flavour)
    qmax = torch.finfo(flavour).max
    assert data.dtype == flavour and scale is not None
    assert data.float().abs().amax(-1).eq(qmax).all()  # each row's largest value lands on the grid's max
    back = dequantize(data, scale, KVFormat.FP8, torch.float32)
    assert (back - x).abs().max() <= x.abs().amax() / 8  # 3 mantissa bits
    with pytest.raises(ValueError):
        quantize(x, KVFormat.FP8, torch.int8)

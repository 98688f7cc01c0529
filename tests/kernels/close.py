"""How the kernel tests compare a kernel's output with its reference: within tolerances, by relative error, within a
few ulps, or byte for byte (pools of quantized K/V, whose garbage may hold NaNs)."""

from __future__ import annotations

import torch

from kvstore.formats import LayerKV
from kvstore.pool import KVPool


def assert_close(actual: torch.Tensor, expected: torch.Tensor, *, rtol: float, atol: float = 0.0,
                 atol_of_max: float = 0.0) -> None:  # fmt: skip
    """torch.testing.assert_close with |actual - expected| <= atol + atol_of_max * max|expected| + rtol * |expected|.

    atol_of_max: an absolute tolerance in units of the largest expected value, for outputs whose scale depends on the
    sizes (a dot product over K grows with sqrt(K)).
    """
    if atol_of_max:
        atol = atol + atol_of_max * expected.abs().max().item()
    torch.testing.assert_close(actual, expected, rtol=rtol, atol=atol)


def rel_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """||actual - expected|| / ||expected||, in float32 over all elements (Frobenius norms)."""
    return ((actual.float() - expected.float()).norm() / expected.float().norm()).item()


def assert_close_to_ulps(actual: torch.Tensor, expected: torch.Tensor) -> None:
    """Equal but for rare differences of at most 2 ulps of their dtype (float32: within 1e-6): a float32 sum of
    squares added in another order (and torch's CUDA rsqrt is approximate) can move a normalized value by one ulp,
    and its product with the weight by up to two. Measured on an H200 at [4096, 4096] bf16: ~1e-5 of elements
    differ, <= 1.6 ulps."""
    assert actual.dtype == expected.dtype and actual.shape == expected.shape
    if actual.dtype == torch.float32:
        torch.testing.assert_close(actual, expected, atol=1e-6, rtol=1e-6)
        return
    ulp = torch.finfo(actual.dtype).eps * expected.float().abs().clamp_min(torch.finfo(actual.dtype).tiny)
    assert ((actual.float() - expected.float()).abs() <= 2 * ulp).all()
    assert (actual != expected).float().mean().item() < 1e-3


def assert_same_bytes(expected: torch.Tensor, actual: torch.Tensor, what: str = "bytes") -> None:
    """The same bytes (NaN payloads too, which torch.equal never finds equal); says how many differ and where."""
    expected_bytes = expected.flatten().view(torch.uint8)
    actual_bytes = actual.flatten().view(torch.uint8)
    assert expected_bytes.shape == actual_bytes.shape, (expected.shape, actual.shape)
    mismatch = (expected_bytes != actual_bytes).nonzero().flatten()
    assert mismatch.numel() == 0, f"{mismatch.numel()} {what} differ, the first at {mismatch[:5].tolist()}"


def assert_same_kv(expected: KVPool | LayerKV, actual: KVPool | LayerKV) -> None:
    """Byte for byte: a whole pool's buffer (data and scales of every layer, so nothing was written where it should
    not be), or one layer's K/V data and scales."""
    if isinstance(expected, KVPool):
        assert isinstance(actual, KVPool)
        assert_same_bytes(expected.buffer, actual.buffer, "pool bytes")
        return
    for name in ("k_cache", "v_cache", "k_scale", "v_scale"):
        want, got = getattr(expected, name), getattr(actual, name)
        assert (want is None) == (got is None), name
        if want is not None:
            assert_same_bytes(want, got, f"{name} bytes")

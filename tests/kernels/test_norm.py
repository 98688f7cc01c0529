"""The Triton rms_norm, fused_add_rms_norm and fused_add_rms_norm_parts (kernels/triton_norm.py) against
kernels/norm.py's references.

Without a GPU they run under TRITON_INTERPRET=1 (tests/conftest.py sets it) at small, odd sizes, fp32 standing in for
bf16 there (the interpreter's bf16 casts are wrong); the `gpu` test repeats the checks at a real size in bf16.
"""

from __future__ import annotations

import os

import pytest
import torch

pytest.importorskip("triton", reason="triton is not installed: the Triton kernels cannot be tested")

HAS_GPU = torch.cuda.is_available()
INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
if not HAS_GPU and not INTERPRET:
    pytest.skip("no GPU and TRITON_INTERPRET is not 1: Triton kernels cannot run here", allow_module_level=True)


from kernels.norm import fused_add_rms_norm_ref, rms_norm_ref  # noqa: E402
from kernels.triton_norm import fused_add_rms_norm, rms_norm  # noqa: E402
from tests.kernels.close import assert_close_to_ulps  # noqa: E402

# Interpreted kernels read CPU tensors; on a GPU machine the small tests run on the GPU too.
DEVICE = "cuda" if HAS_GPU and not INTERPRET else "cpu"
# "Full precision" KV and query: fp32 is the CPU stand-in for bf16 (the interpreter cannot do bf16).
HALF_DTYPES = [torch.float16] if INTERPRET else [torch.float16, torch.bfloat16]
SMALL_DTYPES = [torch.float32, *HALF_DTYPES]


@pytest.mark.parametrize("dtype", SMALL_DTYPES)
@pytest.mark.parametrize("hidden", [72, 200])
def test_rms_norm_matches_ref(hidden: int, dtype: torch.dtype) -> None:
    g = torch.Generator().manual_seed(hidden)
    x = (torch.randn(2, 7, hidden, generator=g) * 3).to(DEVICE, dtype)
    residual = torch.randn(2, 7, hidden, generator=g).to(DEVICE, dtype)
    weight = torch.randn(hidden, generator=g).to(DEVICE, dtype)
    assert_close_to_ulps(rms_norm(x, weight, 1e-5), rms_norm_ref(x, weight, 1e-5))
    normed, new_residual = fused_add_rms_norm(x, residual, weight, 1e-5)
    normed_ref, new_residual_ref = fused_add_rms_norm_ref(x, residual, weight, 1e-5)
    # The add is one float32 add rounded once: exact.
    assert torch.equal(new_residual, new_residual_ref)
    assert_close_to_ulps(normed, normed_ref)


def test_rms_norm_float32_weight_and_strided_rows() -> None:
    """A float32 weight with fp16 activations (torch promotes the product to float32), rows with padding."""
    g = torch.Generator().manual_seed(1)
    x = (torch.randn(5, 96, generator=g) * 2).to(DEVICE, torch.float16)[:, :72]
    weight = torch.randn(72, generator=g).to(DEVICE)
    assert_close_to_ulps(rms_norm(x, weight, 1e-6), rms_norm_ref(x, weight, 1e-6))


def test_fused_add_rms_norm_of_partial_sums() -> None:
    """fused_add_rms_norm_parts: x given as float32 partial sums (a split-K projection's), summed in order and
    rounded in the kernel: bit for bit the fused add + norm of that rounded sum; wrong shapes refused."""
    from kernels.triton_norm import fused_add_rms_norm_parts

    g = torch.Generator().manual_seed(2)
    parts = torch.randn(3, 5, 200, generator=g).to(DEVICE)
    residual = torch.randn(5, 200, generator=g).to(DEVICE, torch.float16)
    weight = (1 + 0.1 * torch.randn(200, generator=g)).to(DEVICE, torch.float16)
    normed, new_residual = fused_add_rms_norm_parts(parts, residual, weight, 1e-5)
    x = (parts[0] + parts[1] + parts[2]).to(torch.float16)
    want_normed, want_residual = fused_add_rms_norm(x, residual, weight, 1e-5)
    assert torch.equal(new_residual, want_residual) and torch.equal(normed, want_normed)
    with pytest.raises(ValueError):
        fused_add_rms_norm_parts(parts[:, :4], residual, weight, 1e-5)
    with pytest.raises(ValueError):
        fused_add_rms_norm_parts(parts.double(), residual, weight, 1e-5)


# ---------------------------------------------------------------------------------------------------------------------
# GPU, real size


@pytest.mark.gpu
@pytest.mark.parametrize("hidden", [4096, 5120])
def test_gpu_norm_real_size(hidden: int) -> None:
    x = torch.randn(4096, hidden, device="cuda").to(torch.bfloat16)
    residual = torch.randn(4096, hidden, device="cuda").to(torch.bfloat16)
    weight = (1 + 0.1 * torch.randn(hidden, device="cuda")).to(torch.bfloat16)
    assert_close_to_ulps(rms_norm(x, weight, 1e-5), rms_norm_ref(x, weight, 1e-5))
    normed, new_residual = fused_add_rms_norm(x, residual, weight, 1e-5)
    normed_ref, new_residual_ref = fused_add_rms_norm_ref(x, residual, weight, 1e-5)
    assert torch.equal(new_residual, new_residual_ref)
    assert_close_to_ulps(normed, normed_ref)

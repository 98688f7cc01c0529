"""The Triton silu_and_mul (kernels/triton_activation.py) against silu_and_mul_ref (kernels/activation.py).

Without a GPU it runs under TRITON_INTERPRET=1 (tests/conftest.py sets it) at small, odd sizes, fp32 standing in for
bf16 there (the interpreter's bf16 casts are wrong); the `gpu` test repeats the check at a real size in bf16.
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


from kernels.activation import silu_and_mul_ref  # noqa: E402
from kernels.triton_activation import silu_and_mul  # noqa: E402

# Interpreted kernels read CPU tensors; on a GPU machine the small tests run on the GPU too.
DEVICE = "cuda" if HAS_GPU and not INTERPRET else "cpu"
# "Full precision" KV and query: fp32 is the CPU stand-in for bf16 (the interpreter cannot do bf16).
HALF_DTYPES = [torch.float16] if INTERPRET else [torch.float16, torch.bfloat16]
SMALL_DTYPES = [torch.float32, *HALF_DTYPES]


@pytest.mark.parametrize("dtype", SMALL_DTYPES)
@pytest.mark.parametrize("d", [72, 200, 1100])
def test_silu_and_mul_matches_ref(d: int, dtype: torch.dtype) -> None:
    x = (torch.randn(3, 5, 2 * d, generator=torch.Generator().manual_seed(d)) * 4).to(DEVICE, dtype)
    out = silu_and_mul(x)
    ref = silu_and_mul_ref(x)
    assert out.shape == (3, 5, d) and out.dtype == dtype
    # exp differs from torch's in the last float32 bit; a half-precision result then rounds alike nearly always.
    tol = {torch.float32: 1e-6, torch.float16: 1e-3, torch.bfloat16: 8e-3}[dtype]
    torch.testing.assert_close(out, ref, atol=tol, rtol=tol)
    with pytest.raises(ValueError):
        silu_and_mul(torch.randn(3, 7, device=DEVICE))


# ---------------------------------------------------------------------------------------------------------------------
# GPU, real size


@pytest.mark.gpu
def test_gpu_silu_and_mul_real_size() -> None:
    x = torch.randn(4096, 2 * 14336, device="cuda").to(torch.bfloat16)
    torch.testing.assert_close(silu_and_mul(x).float(), silu_and_mul_ref(x).float(), atol=8e-3, rtol=8e-3)

"""The Triton rotary (kernels/triton_rotary.py) against rotary_ref (kernels/rotary.py), Llama 3.1's scaled
frequencies, partial rotary, GQA head counts that are not powers of two.

Without a GPU it runs under TRITON_INTERPRET=1 (tests/conftest.py sets it) at small, odd sizes, fp32 standing in for
bf16 there (the interpreter's bf16 casts are wrong); the `gpu` test repeats the check at Llama-3's shape in bf16.
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


from kernels.rotary import compute_inv_freq, make_cos_sin_cache, rotary_ref  # noqa: E402
from kernels.triton_rotary import rotary  # noqa: E402
from tests.kernels.inputs import LLAMA31  # noqa: E402

# Interpreted kernels read CPU tensors; on a GPU machine the small tests run on the GPU too.
DEVICE = "cuda" if HAS_GPU and not INTERPRET else "cpu"
# "Full precision" KV and query: fp32 is the CPU stand-in for bf16 (the interpreter cannot do bf16).
HALF_DTYPES = [torch.float16] if INTERPRET else [torch.float16, torch.bfloat16]
SMALL_DTYPES = [torch.float32, *HALF_DTYPES]


@pytest.mark.parametrize("dtype", SMALL_DTYPES)
@pytest.mark.parametrize(("head_dim", "rot_dim"), [(40, 40), (72, 72), (200, 200), (72, 32)])
def test_rotary_matches_ref(head_dim: int, rot_dim: int, dtype: torch.dtype) -> None:
    g = torch.Generator().manual_seed(head_dim + rot_dim)
    max_positions = 3000
    positions = torch.cat([torch.arange(5), torch.randint(0, max_positions, (6,), generator=g)]).to(DEVICE)
    # num_heads 5 and num_kv_heads 3: not powers of two. The query is a strided slice, as out of a qkv projection.
    qkv = torch.randn(len(positions), 8, head_dim, generator=g).to(DEVICE, dtype)
    query, key = qkv[:, :5], qkv[:, 5:]
    inv_freq = compute_inv_freq(rot_dim, 500000.0, LLAMA31)
    cache = make_cos_sin_cache(inv_freq, max_positions, torch.float32).to(DEVICE)
    q_out, k_out = rotary(positions, query, key, cache)
    q_ref, k_ref = rotary_ref(positions, query, key, cache)
    assert q_out.dtype == dtype and k_out.dtype == dtype and q_out.shape == query.shape and k_out.shape == key.shape
    tol = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}[dtype]
    torch.testing.assert_close(q_out, q_ref, atol=tol, rtol=tol)
    torch.testing.assert_close(k_out, k_ref, atol=tol, rtol=tol)
    # The inputs are untouched (out of place) and the unrotated tail is copied bit for bit.
    assert torch.equal(qkv[:, :5], query)
    assert torch.equal(q_out[..., rot_dim:], query[..., rot_dim:])
    assert torch.equal(q_out[:5][positions[:5] == 0], query[:5][positions[:5] == 0])


# ---------------------------------------------------------------------------------------------------------------------
# GPU, real size


@pytest.mark.gpu
def test_gpu_rotary_llama3() -> None:
    max_positions = 131072
    cache = make_cos_sin_cache(compute_inv_freq(128, 500000.0, LLAMA31).cuda(), max_positions, torch.float32)
    positions = torch.randint(0, max_positions, (4096,), device="cuda")
    qkv = torch.randn(4096, 48, 128, device="cuda").to(torch.bfloat16)
    query, key = qkv[:, :32], qkv[:, 32:40]
    q_out, k_out = rotary(positions, query, key, cache)
    q_ref, k_ref = rotary_ref(positions, query, key, cache)
    # A fused multiply-add may round differently from the reference's separate products, by one bf16 ulp at most.
    torch.testing.assert_close(q_out.float(), q_ref.float(), atol=1.6e-2, rtol=1.6e-2)
    torch.testing.assert_close(k_out.float(), k_ref.float(), atol=1.6e-2, rtol=1.6e-2)
    assert (q_out != q_ref).float().mean().item() < 1e-2

"""The batch-1 Triton GEMV (kernels/triton_gemv.py) against gemv_ref (kernels/gemv.py: torch's linear), and
ops.linear's choice between them.

Without a GPU it runs under TRITON_INTERPRET=1 (tests/conftest.py) at small, odd sizes, in fp16 (the interpreter's
bf16 is unreliable); the `gpu` test repeats it at the Llama-3-8B shapes in bf16.
"""

from __future__ import annotations

import os

import pytest
import torch

pytest.importorskip("triton", reason="triton is not installed: the Triton kernels cannot be tested")

HAS_GPU = torch.cuda.is_available()
if not HAS_GPU and os.environ.get("TRITON_INTERPRET") != "1":
    pytest.skip("no GPU and TRITON_INTERPRET is not 1: Triton kernels cannot run here", allow_module_level=True)

from kernels import ops  # noqa: E402
from kernels.gemv import gemv_ref  # noqa: E402
from kernels.triton_gemv import gemv, gemv_config  # noqa: E402
from tests.kernels.close import assert_close, rel_error  # noqa: E402

DEVICE = "cuda" if HAS_GPU else "cpu"
DTYPE = torch.bfloat16 if HAS_GPU else torch.float16


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize(("n", "k"), [(37, 256), (16, 192), (20000, 128), (9, 8192)])
def test_gemv_matches_linear(n, k, bias):
    gen = torch.Generator().manual_seed(n + k)
    w = torch.randn(n, k, generator=gen).to(DEVICE, DTYPE)
    x = torch.randn(1, k, generator=gen).to(DEVICE, DTYPE)
    b = torch.randn(n, generator=gen).to(DEVICE, DTYPE) if bias else None
    y, new_residual = gemv(x, w, b)
    assert y.shape == (1, n) and y.dtype == DTYPE and new_residual is None
    ref = gemv_ref(x, w, b)
    # float32 accumulation either way: only the output's rounding to 16 bits differs
    assert_close(y.float(), ref, rtol=1e-2, atol_of_max=1e-2)


def test_config_covers_tiles_and_refuses_odd_k():
    # every config's BLOCK_K divides K, or there is none and the caller falls back to torch
    for n, k in [(6144, 4096), (4096, 4096), (28672, 4096), (4096, 14336), (128256, 4096), (576, 1536), (50, 192)]:
        _, block_k, _ = gemv_config(n, k)
        assert k % block_k == 0
    assert gemv_config(64, 100) is None
    w = torch.randn(8, 100, dtype=DTYPE, device=DEVICE)
    x = torch.randn(1, 100, dtype=DTYPE, device=DEVICE)
    assert gemv(x, w) is None
    torch.testing.assert_close(ops.linear(x, w).float(), gemv_ref(x, w, None), rtol=1e-2, atol=1e-2)


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_GPU, reason="needs a GPU")
@pytest.mark.parametrize(("n", "k"), [(6144, 4096), (4096, 4096), (28672, 4096), (4096, 14336), (128256, 4096)])
def test_gemv_llama3_8b_shapes(n, k):
    w = torch.randn(n, k, dtype=torch.bfloat16, device="cuda") * 0.02
    x = torch.randn(1, k, dtype=torch.bfloat16, device="cuda")
    y = ops.linear(x, w)
    ref = gemv_ref(x, w, None)
    assert_close(y.float(), ref, rtol=1e-2, atol_of_max=1e-2)


@pytest.mark.parametrize("with_residual", [False, True])
@pytest.mark.parametrize(("n", "k"), [(37, 256), (20, 192)])
def test_norm_linear_fused_equals_unfused(n, k, with_residual):
    """The GEMV's norm prologue against the torch references: the same norm, the same roundings, one kernel."""
    from kernels import triton_gemv as g
    from kernels.norm import fused_add_rms_norm_ref, rms_norm_ref

    gen = torch.Generator().manual_seed(n * k)
    x = torch.randn(1, k, generator=gen).to(DEVICE, DTYPE)
    residual = torch.randn(1, k, generator=gen).to(DEVICE, DTYPE) if with_residual else None
    norm_w = (1 + 0.1 * torch.randn(k, generator=gen)).to(DEVICE, DTYPE)
    w = torch.randn(n, k, generator=gen).to(DEVICE, DTYPE)
    prologue = g.ADD_NORM if with_residual else g.NORM
    y, new_residual = g.gemv(x, w, None, prologue, residual, norm_w, 1e-5)
    if with_residual:
        normed, want_residual = fused_add_rms_norm_ref(x, residual, norm_w, 1e-5)
        assert torch.equal(new_residual, want_residual)
    else:
        normed = rms_norm_ref(x, norm_w, 1e-5)
        assert new_residual is None
    ref = gemv_ref(normed, w, None)
    assert_close(y.float(), ref, rtol=1e-2, atol_of_max=1e-2)


def test_silu_mul_linear_fused_equals_unfused():
    from kernels import triton_gemv as g
    from kernels.activation import silu_and_mul_ref

    gen = torch.Generator().manual_seed(5)
    gate_up = torch.randn(1, 2 * 192, generator=gen).to(DEVICE, DTYPE)
    w = torch.randn(24, 192, generator=gen).to(DEVICE, DTYPE)
    y, _ = g.gemv(gate_up, w, None, g.SILU_MUL)
    ref = gemv_ref(silu_and_mul_ref(gate_up), w, None)
    assert_close(y.float(), ref, rtol=1e-2, atol_of_max=1e-2)


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_GPU, reason="needs a GPU")
def test_fused_prologues_llama3_8b_shapes():
    from kernels.activation import silu_and_mul_ref
    from kernels.norm import fused_add_rms_norm_ref

    x = torch.randn(1, 4096, dtype=torch.bfloat16, device="cuda")
    residual = torch.randn_like(x)
    norm_w = 1 + 0.1 * torch.randn(4096, dtype=torch.bfloat16, device="cuda")
    w = torch.randn(6144, 4096, dtype=torch.bfloat16, device="cuda") * 0.02
    from kernels import triton_gemv as g

    y, new_residual = g.gemv(x, w, None, g.ADD_NORM, residual, norm_w, 1e-5)
    normed, want_residual = fused_add_rms_norm_ref(x, residual, norm_w, 1e-5)
    assert torch.equal(new_residual, want_residual)
    ref = gemv_ref(normed, w, None)
    assert_close(y.float(), ref, rtol=1e-2, atol_of_max=1e-2)
    gate_up = torch.randn(1, 2 * 14336, dtype=torch.bfloat16, device="cuda")
    down = torch.randn(4096, 14336, dtype=torch.bfloat16, device="cuda") * 0.02
    ref = gemv_ref(silu_and_mul_ref(gate_up), down, None)
    y, _ = g.gemv(gate_up, down, None, g.SILU_MUL)
    assert_close(y.float(), ref, rtol=1e-2, atol_of_max=1e-2)


@pytest.mark.parametrize(("n", "k"), [(2 * 24, 192), (2 * 9000, 128)])
def test_silu_mul_epilogue_equals_gemv_then_activation(n, k):
    """gate_up with the activation as its epilogue: bit for bit the plain GEMV's [gate, up] followed by the
    activation (the same dot products, rounded at the same points), and close to torch; a bias or an odd row count
    is not its case (None: the caller falls back)."""
    from kernels import triton_gemv as g
    from kernels.activation import silu_and_mul_ref

    gen = torch.Generator().manual_seed(8)
    x = torch.randn(1, k, generator=gen).to(DEVICE, DTYPE)
    w = (torch.randn(n, k, generator=gen) * 0.1).to(DEVICE, DTYPE)
    y, _ = g.gemv(x, w, epilogue=g.SILU_MUL_OUT)
    assert y.shape == (1, n // 2)
    assert torch.equal(y, silu_and_mul_ref(g.gemv(x, w)[0]))
    ref = silu_and_mul_ref(gemv_ref(x, w, None).to(DTYPE)).float()
    assert_close(y.float(), ref, rtol=2e-2, atol_of_max=2e-2)
    assert g.gemv(x, w, torch.zeros(n, device=DEVICE, dtype=DTYPE), epilogue=g.SILU_MUL_OUT) is None
    assert g.gemv(x, w[:-1], epilogue=g.SILU_MUL_OUT) is None


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_GPU, reason="needs a GPU")
def test_silu_mul_epilogue_llama3_8b_shape():
    from kernels import triton_gemv as g
    from kernels.activation import silu_and_mul_ref

    x = torch.randn(1, 4096, dtype=torch.bfloat16, device="cuda")
    w = torch.randn(2 * 14336, 4096, dtype=torch.bfloat16, device="cuda") * 0.02
    y, _ = g.gemv(x, w, epilogue=g.SILU_MUL_OUT)
    # the tile's row sums may reduce in another order than with the plain kernel's tile: one bf16 rounding apart
    want = silu_and_mul_ref(g.gemv(x, w)[0]).float()
    assert_close(y.float(), want, rtol=1e-2, atol_of_max=1e-2)


@pytest.mark.parametrize(("n", "k"), [(37, 256), (20, 192), (9, 8192)])
def test_add_res_sumsq_epilogue(n, k):
    """o_proj / down_proj adding the residual: bit for bit the plain GEMV's output plus the residual, rounded as
    kernels/norm.py's fused add rounds it, and partial sums of squares that add up to the new residual's."""
    from kernels import triton_gemv as g

    gen = torch.Generator().manual_seed(n + k)
    x = torch.randn(1, k, generator=gen).to(DEVICE, DTYPE)
    w = (torch.randn(n, k, generator=gen) * k**-0.5).to(DEVICE, DTYPE)
    residual = torch.randn(1, n, generator=gen).to(DEVICE, DTYPE)
    hidden, sumsq = g.gemv(x, w, residual=residual, epilogue=g.ADD_RES_SUMSQ)
    plain = g.gemv(x, w)[0]
    assert torch.equal(hidden, (plain.float() + residual.float()).to(DTYPE))
    block_n = g.gemv_config(n, k)[0]
    assert sumsq.dtype == torch.float32 and sumsq.shape == (-(-n // block_n),)
    want = hidden.double().pow(2).sum().item()
    assert abs(sumsq.double().sum().item() - want) <= 1e-5 * want
    with pytest.raises(ValueError):
        g.gemv(x, w, epilogue=g.ADD_RES_SUMSQ)  # no residual


@pytest.mark.parametrize(("n", "k"), [(2 * 24, 256), (20, 192), (2 * 9, 8192)])
def test_preload_changes_nothing(n, k):
    """The first weight chunk read before the PDL wait (PRELOAD) and added first: the same operations in the same
    order, so bit for bit the same outputs as without, for each prologue and epilogue it meets in a batch-1 step (one
    chunk only at k 192)."""
    from kernels import triton_gemv as g

    gen = torch.Generator().manual_seed(7 * n + k)
    x = torch.randn(1, k, generator=gen).to(DEVICE, DTYPE)
    w = (torch.randn(n, k, generator=gen) * k**-0.5).to(DEVICE, DTYPE)
    residual = torch.randn(1, k, generator=gen).to(DEVICE, DTYPE)
    out_residual = torch.randn(1, n, generator=gen).to(DEVICE, DTYPE)
    norm_w = (1 + 0.1 * torch.randn(k, generator=gen)).to(DEVICE, DTYPE)
    sumsq = x.float().pow(2).view(1, -1).sum(1)
    cases = [
        dict(),
        dict(residual=out_residual, epilogue=g.ADD_RES_SUMSQ),
        dict(prologue=g.ADD_NORM, residual=residual, norm_weight=norm_w, eps=1e-5),
        dict(prologue=g.NORM_SUMSQ, norm_weight=norm_w, eps=1e-5, sumsq=sumsq, epilogue=g.SILU_MUL_OUT),
    ]
    for case in cases:
        want = g.gemv(x, w, **case, preload=False)
        got = g.gemv(x, w, **case, preload=True)
        assert got is not None and want is not None
        for a, b in zip(got, want, strict=True):
            assert (a is None and b is None) or torch.equal(a, b), case


@pytest.mark.parametrize("silu", [False, True])
@pytest.mark.parametrize(("n", "k"), [(37, 256), (2 * 24, 192)])
def test_norm_sumsq_prologue(n, k, silu):
    """The next projection normalizing with those partial sums: the unfused norm + projection (+ activation) up to
    the roundings the fused form skips (docstring of NORM_SUMSQ)."""
    from kernels import triton_gemv as g
    from kernels.activation import silu_and_mul_ref
    from kernels.norm import rms_norm_ref

    if silu and n % 2:
        pytest.skip("gate_up has an even row count")
    gen = torch.Generator().manual_seed(3 * n + k)
    hidden = torch.randn(1, k, generator=gen).to(DEVICE, DTYPE)
    norm_w = (1 + 0.1 * torch.randn(k, generator=gen)).to(DEVICE, DTYPE)
    w = (torch.randn(n, k, generator=gen) * k**-0.5).to(DEVICE, DTYPE)
    # partial sums as a producer leaves them: uneven pieces of the whole
    squares = hidden.float().pow(2).view(-1)
    sumsq = torch.stack([squares[: k // 3].sum(), squares[k // 3 : k // 2].sum(), squares[k // 2 :].sum()])
    epilogue = g.SILU_MUL_OUT if silu else g.OUT
    y, _ = g.gemv(hidden, w, None, g.NORM_SUMSQ, None, norm_w, 1e-5, epilogue=epilogue, sumsq=sumsq)
    ref = gemv_ref(rms_norm_ref(hidden, norm_w, 1e-5), w, None)
    if silu:
        ref = silu_and_mul_ref(ref.to(DTYPE)).float()
    assert_close(y.float(), ref, rtol=2e-2, atol_of_max=2e-2)
    # the norm really is applied: without the partial sums' scale the result is far off
    off, _ = g.gemv(hidden, w, None, g.NORM_SUMSQ, None, norm_w, 1e-5, epilogue=epilogue, sumsq=4 * sumsq)
    assert not torch.allclose(off.float(), ref, rtol=5e-2, atol=5e-2 * ref.abs().max().item())
    with pytest.raises(ValueError):
        g.gemv(hidden, w, None, g.NORM_SUMSQ, None, norm_w, 1e-5)  # no partial sums


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_GPU, reason="needs a GPU")
def test_sumsq_norm_decode_step_on_8b_shape(monkeypatch):
    """A whole batch-1 decode step of the 8B-shape checkpoint (int8 KV, 1k context) with the norms folded into the
    projections (ops.SUMSQ_NORM) against the same step with the norm kernels: same logits to well inside the 2e-2
    bound the GPU engine keeps against HF, same top token."""
    ckpt = os.environ.get("KVRELAY_8B_CHECKPOINT")
    if not ckpt:
        pytest.skip("set KVRELAY_8B_CHECKPOINT to a `make-checkpoint --preset llama3-8b` directory")
    from bench.model_bench import fill_random
    from kvstore.formats import parse_kv_dtype
    from kvstore.pool import KVPool, PoolGeometry
    from services.model.loader import load_model
    from services.model.runner import ModelRunner, SeqChunk

    model = load_model(ckpt, torch.bfloat16, "cuda", progress=False)
    c = model.config
    geometry = PoolGeometry(c.num_layers, 65, 16, c.num_kv_heads, c.head_dim)
    pool = KVPool.allocate(geometry, parse_kv_dtype("int8", torch.bfloat16), "cuda")
    torch.manual_seed(0)
    fill_random(pool)
    runner = ModelRunner(model, pool)
    logits = {}
    for on in (True, False):
        monkeypatch.setattr(ops, "SUMSQ_NORM", on)
        chunk = SeqChunk((1234,), 1024, tuple(range(65)))  # rewrites the same slot each time
        logits[on] = runner.forward([chunk]).float()
    rel = rel_error(logits[True], logits[False])
    assert rel < 1e-2, rel
    assert logits[True].argmax() == logits[False].argmax()

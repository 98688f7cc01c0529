"""The Triton skinny GEMM (kernels/triton_skinny_gemm.py) against skinny_gemm_ref (kernels/skinny_gemm.py).

On the CPU under TRITON_INTERPRET=1 at small odd sizes in fp16 (Triton 3.6's interpreter computes bf16 dots wrongly:
garbage of order 1e10 on random inputs, so bf16 is tested on the GPU only); on a GPU, the 8B projection shapes at
decode batch sizes in bf16, replayed from a CUDA graph, and the MLP through kernels/ops.py with and without it.
"""

from __future__ import annotations

import pytest
import torch

triton = pytest.importorskip("triton", reason="triton is not installed (pip install triton): no Triton kernel to test")

from kernels import ops  # noqa: E402
from kernels.skinny_gemm import skinny_gemm_ref  # noqa: E402
from kernels.triton_skinny_gemm import MAX_ROWS, SILU_MUL_OUT, skinny_gemm  # noqa: E402
from tests.kernels.close import rel_error  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def _inputs(m: int, n: int, k: int, dtype: torch.dtype, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(m, k, generator=g).to(dtype).to(DEVICE)
    w = (torch.randn(n, k, generator=g) * k**-0.5).to(dtype).to(DEVICE)
    return x, w


# (rows, output columns, K): one row, a few, 17 (odd, BLOCK_M 32), MAX_ROWS; N not a multiple of the 32-column tile;
# K a multiple of 64 but not of 128.
CPU_CASES = [(1, 40, 64), (5, 96, 128), (17, 70, 192), (MAX_ROWS, 33, 64)]


@pytest.mark.parametrize(("m", "n", "k"), CPU_CASES)
@pytest.mark.parametrize("silu", [False, True])
def test_skinny_gemm_matches_torch(m: int, n: int, k: int, silu: bool) -> None:
    dtype = torch.float16 if DEVICE == "cpu" else torch.bfloat16
    x, w = _inputs(m, 2 * n if silu else n, k, dtype, seed=m + n)
    y = skinny_gemm(x, w, SILU_MUL_OUT if silu else 0)
    assert y is not None and y.shape == (m, n) and y.dtype == dtype
    tol = 2e-3 if dtype == torch.float16 else 2e-2  # one rounding of the output, accumulated in another order
    torch.testing.assert_close(y.float(), skinny_gemm_ref(x, w, silu).float(), atol=tol, rtol=tol)


@pytest.mark.parametrize(("m", "n", "k"), [(5, 96, 128), (17, 70, 192), (MAX_ROWS, 33, 64)])
@pytest.mark.parametrize("silu", [False, True])
def test_skinny_gemm_preload_changes_nothing(m: int, n: int, k: int, silu: bool) -> None:
    """The first weight tile read before the PDL wait (PRELOAD) and taken into the first dot: the same dots in the
    same order, so bit for bit the output without it (one K tile only at k 64)."""
    dtype = torch.float16 if DEVICE == "cpu" else torch.bfloat16
    x, w = _inputs(m, 2 * n if silu else n, k, dtype, seed=3 * m + n)
    epilogue = SILU_MUL_OUT if silu else 0
    with_preload, without = skinny_gemm(x, w, epilogue, preload=True), skinny_gemm(x, w, epilogue, preload=False)
    assert with_preload is not None and torch.equal(with_preload, without)
    torch.testing.assert_close(with_preload.float(), skinny_gemm_ref(x, w, silu).float(), atol=2e-2, rtol=2e-2)


@pytest.mark.parametrize(("m", "n", "k", "splits"), [(5, 96, 256, 2), (17, 70, 384, 3), (MAX_ROWS, 33, 128, 2)])
def test_skinny_gemm_splits_leave_partial_sums(m: int, n: int, k: int, splits: int) -> None:
    """splits > 1: float32 partial sums [splits, M, N], split s the product over its own share of K (checked one by
    one against torch on that share), none summed or rounded."""
    dtype = torch.float16 if DEVICE == "cpu" else torch.bfloat16
    x, w = _inputs(m, n, k, dtype, seed=5 * m + n)
    parts = skinny_gemm(x, w, tuning={"block_k": 64}, splits=splits)
    assert parts is not None and parts.shape == (splits, m, n) and parts.dtype == torch.float32
    share = k // splits
    for s in range(splits):
        cols = slice(s * share, (s + 1) * share)
        want = torch.nn.functional.linear(x[:, cols].float(), w[:, cols].float())
        torch.testing.assert_close(parts[s], want, atol=1e-4, rtol=1e-4)
    assert skinny_gemm(x, w, tuning={"block_k": 64}, splits=k // 32) is None  # a share of less than one K tile
    assert skinny_gemm(x, torch.cat([w, w]), SILU_MUL_OUT, splits=2) is None  # the activation needs whole sums


def test_partials_through_the_next_norm_and_projection() -> None:
    """A layer's down_proj left as ops.Partials reaches the next layer's norm + projection (ops.norm_linear) and the
    model's final norm (ops.fused_add_rms_norm): both equal the same calls on the summed, rounded output."""
    g = torch.Generator().manual_seed(9)
    dtype = torch.float16 if DEVICE == "cpu" else torch.bfloat16
    parts = torch.randn(2, 6, 64, generator=g).to(DEVICE)
    partials = ops.Partials(parts, dtype)
    residual = torch.randn(6, 64, generator=g).to(DEVICE, dtype)
    norm_w = (1 + 0.1 * torch.randn(64, generator=g)).to(DEVICE, dtype)
    w = (torch.randn(40, 64, generator=g) / 8).to(DEVICE, dtype)
    dense = (parts[0] + parts[1]).to(dtype)
    y, new_residual = ops.norm_linear(partials, residual, norm_w, 1e-5, w)
    want_y, want_residual = ops.norm_linear(dense, residual, norm_w, 1e-5, w)
    assert torch.equal(new_residual, want_residual) and torch.equal(y, want_y)
    normed, _ = ops.fused_add_rms_norm(partials, residual, norm_w, 1e-5)
    assert torch.equal(normed, ops.fused_add_rms_norm(dense, residual, norm_w, 1e-5)[0])


def test_skinny_gemm_declines_what_it_does_not_handle() -> None:
    x, w = _inputs(4, 40, 64, torch.float16, seed=0)
    assert skinny_gemm(torch.empty(0, 64, dtype=torch.float16, device=DEVICE), w) is None  # no rows
    big, _ = _inputs(MAX_ROWS + 1, 8, 64, torch.float16, seed=1)
    assert skinny_gemm(big, w) is None  # a real GEMM: cuBLAS
    odd_k, w_odd_k = _inputs(4, 40, 72, torch.float16, seed=2)
    assert skinny_gemm(odd_k, w_odd_k) is None  # no K tile fits
    assert skinny_gemm(x, w[:39], SILU_MUL_OUT) is None  # odd gate_up rows
    assert skinny_gemm(x[:, :32], w) is None  # K mismatch
    assert skinny_gemm(x.t().contiguous().t(), w) is None  # x not unit-stride along K


# ---------------------------------------------------------------------------------------------------------------------
# GPU, real sizes: the Llama-3-8B projections at decode batches.

SHAPES_8B = [("qkv", 6144, 4096, False), ("o", 4096, 4096, False), ("gate_up", 28672, 4096, True),
             ("down", 4096, 14336, False)]  # fmt: skip


@pytest.mark.gpu
@pytest.mark.parametrize("m", [2, 8, 64, 128])
@pytest.mark.parametrize(("name", "n", "k", "silu"), SHAPES_8B)
def test_skinny_gemm_gpu_real_sizes(m: int, name: str, n: int, k: int, silu: bool) -> None:
    x, w = _inputs(m, n, k, torch.bfloat16, seed=m)
    y = skinny_gemm(x, w, SILU_MUL_OUT if silu else 0)
    torch.testing.assert_close(y.float(), skinny_gemm_ref(x, w, silu).float(), atol=2e-2, rtol=2e-2)


@pytest.mark.gpu
def test_skinny_gemm_cuda_graph() -> None:
    """Captured once (PDL launches inside the graph), replayed after x changes in place."""
    x, w = _inputs(64, 28672, 4096, torch.bfloat16, seed=3)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        skinny_gemm(x, w, SILU_MUL_OUT)  # compile outside the capture
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        y = skinny_gemm(x, w, SILU_MUL_OUT)
    for seed in (4, 5):
        x.copy_(torch.randn(x.shape, generator=torch.Generator().manual_seed(seed)).to(x.dtype))
        graph.replay()
        torch.testing.assert_close(y, skinny_gemm(x, w, SILU_MUL_OUT), atol=0, rtol=0)


@pytest.mark.gpu
def test_mlp_through_ops_with_and_without_the_skinny_gemm(monkeypatch: pytest.MonkeyPatch) -> None:
    """ops.norm_mlp at batch 64 (8B MLP shapes): the skinny path (gate_up with the activation as its epilogue, then
    down) against cuBLAS + the activation kernel."""
    g = torch.Generator().manual_seed(6)
    x = torch.randn(64, 4096, generator=g).to(torch.bfloat16).cuda()
    residual = torch.randn_like(x)
    norm_w = (1 + 0.1 * torch.randn(4096, generator=g)).to(torch.bfloat16).cuda()
    gate_up = (torch.randn(28672, 4096, generator=g) * 4096**-0.5).to(torch.bfloat16).cuda()
    down = (torch.randn(4096, 14336, generator=g) * 14336**-0.5).to(torch.bfloat16).cuda()
    outs = {}
    monkeypatch.setattr(ops, "SPLIT_DOWN", 1)  # down_proj summed here; its split-K partials below
    for on in (True, False):
        monkeypatch.setattr(ops, "SKINNY_GEMM", on)
        outs[on] = ops.norm_mlp(x, residual, norm_w, 1e-5, gate_up, None, down, None)
    torch.testing.assert_close(outs[True][1], outs[False][1], atol=0, rtol=0)  # the same new residual
    rel = rel_error(outs[True][0], outs[False][0])
    assert rel < 1e-2, rel
    # down_proj in 2 splits (ops.SPLIT_DOWN): its partial sums, which the next fused add + norm adds
    monkeypatch.setattr(ops, "SKINNY_GEMM", True)
    monkeypatch.setattr(ops, "SPLIT_DOWN", 2)
    split, new_residual = ops.norm_mlp(x, residual, norm_w, 1e-5, gate_up, None, down, None)
    assert isinstance(split, ops.Partials) and split.parts.shape == (2, 64, 4096)
    torch.testing.assert_close(new_residual, outs[True][1], atol=0, rtol=0)
    rel = rel_error(split.dense(), outs[True][0])
    assert rel < 1e-2, rel
    normed, added = ops.fused_add_rms_norm(split, new_residual, norm_w, 1e-5)
    want_normed, want_added = ops.fused_add_rms_norm(split.dense(), new_residual, norm_w, 1e-5)
    assert torch.equal(normed, want_normed) and torch.equal(added, want_added)

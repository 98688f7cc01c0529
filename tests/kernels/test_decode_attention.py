"""The Triton paged_decode_attention (kernels/triton_decode_attention.py) against paged_decode_attention_ref.

Without a GPU the kernels run under TRITON_INTERPRET=1 (conftest.py sets it) at small, odd sizes; with one, the same
tests run on the GPU, and the tests marked `gpu` add real sizes and CUDA-graph capture.

Decode attention must match paged_decode_attention_ref to float32 rounding with float32 queries, and to bf16/fp16
rounding with 16-bit ones. Its K/V are stored by store_kv_ref (tests/kernels/inputs.py stored_batch).
"""

from __future__ import annotations

import pytest
import torch

triton = pytest.importorskip("triton", reason="triton is not installed (pip install triton): no Triton kernel to test")

from kernels.decode_attention import paged_decode_attention_ref  # noqa: E402
from kernels.triton_decode_attention import (  # noqa: E402
    MIN_TOKENS_PER_SPLIT,
    decode_num_splits,
    paged_decode_attention,
)
from kvstore.formats import KVFormat, KVSpec, parse_kv_dtype  # noqa: E402
from tests.kernels.inputs import DEVICE, parse_spec, stored_batch  # noqa: E402

# Ragged: a single token, less than a block, not a multiple of the block size, several tiles, batch padding (0).
CONTEXT_LENS = [1, 7, 70, 200, 0]

DECODE_CASES = [
    # (spec, num_kv_heads, head_dim, block_size, group, num_splits, query dtype)
    ("fp32", 2, 40, 4, 3, 1, torch.float32),
    ("fp32", 1, 64, 16, 1, 3, torch.float32),
    ("bf16", 2, 64, 4, 3, 3, torch.float32),
    ("int8", 2, 40, 16, 3, 3, torch.float32),
    ("fp8", 1, 64, 4, 4, 1, torch.float32),
    ("fp8+fnuz", 1, 64, 4, 4, 1, torch.float32),  # MI300X's e4m3fnuz (tests/kernels/inputs.py FNUZ)
    ("k=int8,v=bf16", 2, 40, 16, 1, 3, torch.float32),
    ("int8", 2, 64, 16, 3, 2, torch.float16),  # 16-bit dots: int8 -> fp16 exactly, probabilities rounded to fp16
    ("fp8", 2, 40, 16, 4, 3, torch.bfloat16),  # a bf16 query with an 8-bit cache: the dots run in fp16
    ("fp8+fnuz", 2, 40, 16, 4, 3, torch.bfloat16),
    # int8 with 16-bit queries: K biased by 1152 and V read as int16 pairs of dims (`_pairs_to_dot`); one split
    # (the output written by the split kernel), padded head_dim (40 -> 64), V alone in int8, odd head_dim (no pairs).
    # No bf16 dot here: Triton 3.6's interpreter computes bf16 tl.dot wrongly (errors of order 1e10 on random data;
    # "k=bf16,v=int8" failed with the old kernel as with the new), so bf16 K/V with 16-bit queries run on the GPU only.
    ("int8", 1, 40, 4, 4, 1, torch.bfloat16),
    ("k=fp16,v=int8", 2, 64, 16, 2, 3, torch.float16),
    ("k=int8,v=fp8", 2, 64, 8, 3, 1, torch.float16),
    ("k=int8,v=fp8+fnuz", 2, 64, 8, 3, 1, torch.float16),
    ("int8", 1, 33, 4, 2, 2, torch.float16),
]


@pytest.mark.parametrize(
    ("spec_text", "num_kv_heads", "head_dim", "block_size", "group", "num_splits", "dtype"), DECODE_CASES
)
def test_decode_attention_matches_ref(
    spec_text: str, num_kv_heads: int, head_dim: int, block_size: int, group: int, num_splits: int, dtype: torch.dtype
) -> None:
    spec, fp8 = parse_spec(spec_text)
    # Tables wider than needed, padded with block 0, as a graph bucket's are.
    layer, block_tables, context_lens = stored_batch(spec, CONTEXT_LENS, num_kv_heads, head_dim, block_size,
                                                     max_blocks=256 // block_size, fp8=fp8)  # fmt: skip
    g = torch.Generator().manual_seed(5)
    query = torch.randn(len(CONTEXT_LENS), num_kv_heads * group, head_dim, generator=g).to(dtype).to(DEVICE)
    scale = head_dim**-0.5
    expected = paged_decode_attention_ref(query, layer, block_tables, context_lens, scale)
    out = paged_decode_attention(query, layer, block_tables, context_lens, scale, num_splits=num_splits)
    assert out.shape == query.shape and out.dtype == query.dtype
    assert out[-1].eq(0).all()  # batch padding
    tol = {torch.float32: 2e-5, torch.float16: 4e-3, torch.bfloat16: 2e-2}[dtype]
    torch.testing.assert_close(out, expected, atol=tol, rtol=tol)


@pytest.mark.parametrize("max_context_len", [None, 640])
def test_decode_attention_auto_splits(max_context_len: int | None) -> None:
    """The split count chosen from shapes and the hint (more than one here), with sequences far shorter than the
    hint: their surplus splits are empty."""
    context_lens = [600, 5, 33]
    layer, block_tables, lens = stored_batch(KVSpec(KVFormat.INT8, KVFormat.INT8), context_lens, 1, 40, 16,
                                             max_blocks=40)  # fmt: skip
    bound = max_context_len if max_context_len is not None else 40 * 16
    assert decode_num_splits(3, 1, bound, 132) == -(-bound // MIN_TOKENS_PER_SPLIT) > 1
    query = torch.randn(3, 3, 40, generator=torch.Generator().manual_seed(6)).to(DEVICE)
    expected = paged_decode_attention_ref(query, layer, block_tables, lens, 0.2)
    out = paged_decode_attention(query, layer, block_tables, lens, 0.2, max_context_len=max_context_len)
    torch.testing.assert_close(out, expected, atol=2e-5, rtol=2e-5)


def test_decode_num_splits_heuristic() -> None:
    sms = 132
    # A small batch with a long context is split to fill the GPU; a short context is not split.
    assert decode_num_splits(1, 8, 4096, sms) == 4096 // MIN_TOKENS_PER_SPLIT
    assert decode_num_splits(1, 8, MIN_TOKENS_PER_SPLIT - 1, sms) == 1
    # No cliff: the split count falls gradually with the batch, and a dozen long sequences are still split.
    counts = [decode_num_splits(b, 8, 4096, sms) for b in range(1, 300)]
    assert all(a >= b for a, b in zip(counts, counts[1:], strict=False))
    assert counts[12 - 1] > 1 and counts[32 - 1] > 1
    # Once the batch alone gives every SM its programs, one split (and no reduce kernel).
    assert decode_num_splits(256, 8, 4096, sms) == 1
    assert all(1 <= c <= 64 for c in counts)
    assert decode_num_splits(0, 8, 0, sms) >= 1


def test_decode_attention_checks_arguments() -> None:
    layer, block_tables, lens = stored_batch(KVSpec(KVFormat.FP32, KVFormat.FP32), [3], 2, 8, 4)
    with pytest.raises(ValueError, match="multiple"):
        paged_decode_attention(torch.randn(1, 3, 8, device=DEVICE), layer, block_tables, lens, 1.0)
    with pytest.raises(ValueError, match="head_dim"):
        paged_decode_attention(torch.randn(1, 2, 16, device=DEVICE), layer, block_tables, lens, 1.0)
    odd, tables, odd_lens = stored_batch(KVSpec(KVFormat.FP32, KVFormat.FP32), [3], 2, 8, 5)
    with pytest.raises(ValueError, match="power-of-2"):
        paged_decode_attention(torch.randn(1, 2, 8, device=DEVICE), odd, tables, odd_lens, 1.0)
    empty = paged_decode_attention(torch.randn(0, 2, 8, device=DEVICE), layer, block_tables[:0], lens[:0], 1.0)
    assert empty.shape == (0, 2, 8)


# ---------------------------------------------------------------------------------------------------------------------
# GPU, real sizes: batch 32, 32 query heads on 8 KV heads, head_dim 128, contexts up to 4k, bf16 queries.

GPU_SEQS, GPU_HEADS, GPU_KV_HEADS, GPU_HEAD_DIM, GPU_BLOCK, GPU_MAX_CONTEXT = 32, 32, 8, 128, 16, 4096


def _gpu_lens(seed: int) -> list[int]:
    g = torch.Generator().manual_seed(seed)
    lens = torch.randint(1, GPU_MAX_CONTEXT + 1, (GPU_SEQS,), generator=g).tolist()
    lens[0], lens[1], lens[2] = GPU_MAX_CONTEXT, 1, 0
    return lens


@pytest.mark.gpu
@pytest.mark.parametrize("spec_text", ["bf16", "int8"])
@pytest.mark.parametrize("num_splits", [None, 1])
def test_decode_attention_gpu_real_sizes(spec_text: str, num_splits: int | None) -> None:
    spec = parse_kv_dtype(spec_text, torch.bfloat16)
    lens = _gpu_lens(seed=0)
    layer, block_tables, context_lens = stored_batch(spec, lens, GPU_KV_HEADS, GPU_HEAD_DIM, GPU_BLOCK,
                                                     dtype=torch.bfloat16)  # fmt: skip
    query = torch.randn(GPU_SEQS, GPU_HEADS, GPU_HEAD_DIM, device=DEVICE, dtype=torch.bfloat16)
    scale = GPU_HEAD_DIM**-0.5
    expected = paged_decode_attention_ref(query, layer, block_tables, context_lens, scale)
    out = paged_decode_attention(query, layer, block_tables, context_lens, scale, num_splits=num_splits,
                                 max_context_len=GPU_MAX_CONTEXT)  # fmt: skip
    torch.testing.assert_close(out.float(), expected.float(), atol=2e-2, rtol=2e-2)


@pytest.mark.gpu
def test_decode_attention_cuda_graph() -> None:
    """Captured once with a max_context_len hint; replayed after context_lens (and the query) change in place."""
    spec = KVSpec(KVFormat.INT8, KVFormat.BF16)
    # Every sequence holds GPU_MAX_CONTEXT tokens of K/V; context_lens then select how many of them count.
    full = [GPU_MAX_CONTEXT] * GPU_SEQS
    layer, block_tables, context_lens = stored_batch(spec, full, GPU_KV_HEADS, GPU_HEAD_DIM, GPU_BLOCK,
                                                     dtype=torch.bfloat16)  # fmt: skip
    query = torch.randn(GPU_SEQS, GPU_HEADS, GPU_HEAD_DIM, device=DEVICE, dtype=torch.bfloat16)
    scale = GPU_HEAD_DIM**-0.5
    context_lens.copy_(torch.tensor(_gpu_lens(seed=1), dtype=torch.int32))

    def step() -> torch.Tensor:
        return paged_decode_attention(query, layer, block_tables, context_lens, scale, max_context_len=GPU_MAX_CONTEXT)

    # Compile outside the capture, on a side stream as torch.cuda.graph's own warm-up does.
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        step()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = step()

    for seed in (2, 3):
        context_lens.copy_(torch.tensor(_gpu_lens(seed), dtype=torch.int32))
        query.copy_(torch.randn_like(query))
        graph.replay()
        torch.cuda.synchronize()
        expected = paged_decode_attention_ref(query, layer, block_tables, context_lens, scale)
        torch.testing.assert_close(out.float(), expected.float(), atol=2e-2, rtol=2e-2)

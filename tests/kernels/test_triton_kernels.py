"""Triton kernels against their torch references (kernels/*.py, each tested in test_kernel_refs.py).

Without a GPU the kernels run under TRITON_INTERPRET=1 (conftest.py sets it) at small, odd sizes; with one, the same
tests run on the GPU, and the tests marked `gpu` add real sizes and CUDA-graph capture.

store_kv must write the same bytes as store_kv_ref (data and scales, every format). Decode attention must match
paged_decode_attention_ref to float32 rounding with float32 queries, and to bf16/fp16 rounding with 16-bit ones.
"""

from __future__ import annotations

import pytest
import torch

triton = pytest.importorskip("triton", reason="triton is not installed (pip install triton): no Triton kernel to test")

from kernels.decode_attention import paged_decode_attention_ref  # noqa: E402
from kernels.store_kv import store_kv_ref  # noqa: E402
from kernels.triton_decode_attention import (  # noqa: E402
    MIN_TOKENS_PER_SPLIT,
    decode_num_splits,
    paged_decode_attention,
)
from kernels.triton_store_kv import store_kv  # noqa: E402
from kvstore.allocator import BlockAllocator  # noqa: E402
from kvstore.block_table import blocks_needed, make_block_table_tensor, slot_mapping  # noqa: E402
from kvstore.formats import KVFormat, KVSpec, parse_kv_dtype  # noqa: E402
from kvstore.pool import KVPool, LayerKV, PoolGeometry  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
NUM_LAYERS = 2
LAYER = 1  # write and read the second layer, so a layer-offset bug shows


def _pool(spec: KVSpec, num_blocks: int, block_size: int, num_kv_heads: int, head_dim: int, seed: int) -> KVPool:
    """A pool whose bytes are random (identical for the same seed), so that a kernel writing where the reference
    does not, or writing zeros, shows up."""
    geometry = PoolGeometry(NUM_LAYERS, num_blocks, block_size, num_kv_heads, head_dim)
    pool = KVPool.allocate(geometry, spec, DEVICE)
    g = torch.Generator().manual_seed(seed)
    pool.buffer.copy_(torch.randint(0, 256, pool.buffer.shape, dtype=torch.uint8, generator=g))
    if spec.k.has_scale or spec.v.has_scale:
        # Random bytes in a scale region could be NaN/inf; keep the scales finite so that unwritten ones compare.
        for scales in (pool.k_scale, pool.v_scale):
            if scales is not None:
                scales.copy_(torch.rand(scales.shape, generator=g))
    return pool


# ---------------------------------------------------------------------------------------------------------------------
# store_kv


def _tie_rows(head_dim: int) -> torch.Tensor:
    """[3, head_dim] rows that probe rounding: exact halves for int8 (amax 127 -> scale 1), ties on the e4m3 grid,
    normal and subnormal, and negative values that round to -0.0 (amax 448 -> scale 1), and an all-zero row (the
    AMAX_FLOOR path)."""
    rows = torch.zeros(3, head_dim)
    int8_ties = torch.tensor([127.0, 2.5, -3.5, 0.5, -0.5, 1.5, 126.5, -0.25])
    fp8_ties = torch.tensor(
        [448.0, 1.0625, 1.1875, -1.0625, 1.5 * 2**-9, 2**-10, 2.5 * 2**-9, -3.5 * 2**-9, 13.0, -(2**-12), -(2**-10)]
    )
    rows[0, : len(int8_ties)] = int8_ties
    rows[1, : len(fp8_ties)] = fp8_ties
    return rows


def _assert_same_bytes(expected: KVPool, actual: KVPool) -> None:
    """The whole buffer: data and scales of the written slots, and nothing written anywhere else."""
    mismatch = (expected.buffer != actual.buffer).nonzero().flatten()
    assert mismatch.numel() == 0, f"{mismatch.numel()} bytes differ, the first at bytes {mismatch[:5].tolist()}"


STORE_CASES = [
    # (spec, input dtype, num_kv_heads, head_dim, block_size)
    ("fp32", torch.float32, 3, 40, 5),
    ("bf16", torch.float32, 3, 40, 4),  # fp32 -> bf16 rounds to nearest even
    ("bf16", torch.bfloat16, 1, 64, 16),
    ("fp16", torch.bfloat16, 3, 40, 16),
    ("int8", torch.float32, 3, 40, 5),
    ("int8", torch.bfloat16, 1, 64, 4),
    ("fp8", torch.float32, 3, 40, 16),
    ("fp8", torch.bfloat16, 3, 64, 4),
    ("k=int8,v=bf16", torch.float32, 3, 40, 4),
]


@pytest.mark.parametrize(("spec_text", "dtype", "num_kv_heads", "head_dim", "block_size"), STORE_CASES)
def test_store_kv_matches_ref(
    spec_text: str, dtype: torch.dtype, num_kv_heads: int, head_dim: int, block_size: int
) -> None:
    spec = parse_kv_dtype(spec_text, torch.float32)
    num_blocks, num_tokens = 6, 15
    g = torch.Generator().manual_seed(1)
    key = torch.randn(num_tokens, num_kv_heads, head_dim, generator=g) * torch.logspace(-3, 2, num_kv_heads)[:, None]
    value = torch.randn(num_tokens, num_kv_heads, head_dim, generator=g) * 3
    ties = _tie_rows(head_dim)
    key[0, :num_kv_heads] = ties[:num_kv_heads]
    value[1, :num_kv_heads] = ties.flip(0)[:num_kv_heads]
    key[2, 0] = 0  # a token-head of zeros in the middle of a token
    # Distinct slots in shuffled order, two padding tokens.
    slots = torch.randperm(num_blocks * block_size, generator=g)[:num_tokens]
    slots[[3, 11]] = -1
    key, value, slots = key.to(dtype).to(DEVICE), value.to(dtype).to(DEVICE), slots.to(DEVICE)

    expected = _pool(spec, num_blocks, block_size, num_kv_heads, head_dim, seed=2)
    actual = _pool(spec, num_blocks, block_size, num_kv_heads, head_dim, seed=2)
    store_kv_ref(key, value, expected.layer(LAYER), slots)
    store_kv(key, value, actual.layer(LAYER), slots)
    _assert_same_bytes(expected, actual)


def test_store_kv_non_contiguous_input() -> None:
    """key/value as views (e.g. slices of a fused qkv projection) are read through their strides."""
    spec = KVSpec(KVFormat.INT8, KVFormat.BF16)
    qkv = torch.randn(7, 5, 2, 40, device=DEVICE)
    key, value = qkv[:, 1], qkv[:, 3]
    slots = torch.tensor([9, 0, -1, 3, 17, 4, 2], device=DEVICE)
    expected = _pool(spec, 5, 4, 2, 40, seed=3)
    actual = _pool(spec, 5, 4, 2, 40, seed=3)
    store_kv_ref(key, value, expected.layer(LAYER), slots)
    store_kv(key, value, actual.layer(LAYER), slots)
    _assert_same_bytes(expected, actual)


def test_store_kv_checks_shapes() -> None:
    pool = KVPool.allocate(PoolGeometry(1, 2, 4, 2, 8), KVSpec(KVFormat.INT8, KVFormat.INT8), DEVICE)
    key = torch.randn(3, 2, 8, device=DEVICE)
    with pytest.raises(ValueError):
        store_kv(key, key, pool.layer(0), torch.tensor([0, 1], device=DEVICE))
    with pytest.raises(ValueError):
        store_kv(key[:, :1], key[:, :1], pool.layer(0), torch.tensor([0, 1, 2], device=DEVICE))
    # No tokens: nothing to do, no launch.
    store_kv(key[:0], key[:0], pool.layer(0), torch.zeros(0, dtype=torch.int64, device=DEVICE))


# ---------------------------------------------------------------------------------------------------------------------
# decode attention


def _stored_batch(
    spec: KVSpec,
    context_lens: list[int],
    num_kv_heads: int,
    head_dim: int,
    block_size: int,
    dtype: torch.dtype = torch.float32,
    max_blocks: int | None = None,
    seed: int = 0,
    spare: int = 3,
) -> tuple[LayerKV, torch.Tensor, torch.Tensor]:
    """K/V of every sequence stored with store_kv_ref into blocks from a shuffled allocator (and `spare` blocks more).
    Returns (layer, block_tables [num_seqs, max_blocks] int32, context_lens [num_seqs] int32)."""
    need = sum(blocks_needed(n, block_size) for n in context_lens)
    pool = _pool(spec, need + spare, block_size, num_kv_heads, head_dim, seed=seed)
    allocator = BlockAllocator(need + spare, shuffle_seed=seed + 1)
    tables = [allocator.allocate(blocks_needed(n, block_size)) for n in context_lens]
    g = torch.Generator().manual_seed(seed)
    total = sum(context_lens)
    # Heads of different magnitudes, so that per token-head scales matter.
    key = torch.randn(total, num_kv_heads, head_dim, generator=g) * torch.logspace(-1, 1, num_kv_heads)[:, None]
    value = torch.randn(total, num_kv_heads, head_dim, generator=g)
    slots = [s for table, n in zip(tables, context_lens, strict=True) for s in slot_mapping(table, 0, n, block_size)]
    layer = pool.layer(LAYER)
    store_kv_ref(key.to(dtype).to(DEVICE), value.to(dtype).to(DEVICE), layer,
                 torch.tensor(slots, dtype=torch.int64, device=DEVICE))  # fmt: skip
    block_tables = make_block_table_tensor(tables, DEVICE, max_blocks=max_blocks)
    return layer, block_tables, torch.tensor(context_lens, dtype=torch.int32, device=DEVICE)


# Ragged: a single token, less than a block, not a multiple of the block size, several tiles, batch padding (0).
CONTEXT_LENS = [1, 7, 70, 200, 0]

DECODE_CASES = [
    # (spec, num_kv_heads, head_dim, block_size, group, num_splits, query dtype)
    ("fp32", 2, 40, 4, 3, 1, torch.float32),
    ("fp32", 1, 64, 16, 1, 3, torch.float32),
    ("bf16", 2, 64, 4, 3, 3, torch.float32),
    ("int8", 2, 40, 16, 3, 3, torch.float32),
    ("fp8", 1, 64, 4, 4, 1, torch.float32),
    ("k=int8,v=bf16", 2, 40, 16, 1, 3, torch.float32),
    ("int8", 2, 64, 16, 3, 2, torch.float16),  # 16-bit dots: int8 -> fp16 exactly, probabilities rounded to fp16
    ("fp8", 2, 40, 16, 4, 3, torch.bfloat16),  # a bf16 query with an 8-bit cache: the dots run in fp16
    # int8 with 16-bit queries: K biased by 1152 and V read as int16 pairs of dims (`_pairs_to_dot`); one split
    # (the output written by the split kernel), padded head_dim (40 -> 64), V alone in int8, odd head_dim (no pairs).
    # No bf16 dot here: Triton 3.6's interpreter computes bf16 tl.dot wrongly (errors of order 1e10 on random data;
    # "k=bf16,v=int8" failed with the old kernel as with the new), so bf16 K/V with 16-bit queries run on the GPU only.
    ("int8", 1, 40, 4, 4, 1, torch.bfloat16),
    ("k=fp16,v=int8", 2, 64, 16, 2, 3, torch.float16),
    ("k=int8,v=fp8", 2, 64, 8, 3, 1, torch.float16),
    ("int8", 1, 33, 4, 2, 2, torch.float16),
]


@pytest.mark.parametrize(
    ("spec_text", "num_kv_heads", "head_dim", "block_size", "group", "num_splits", "dtype"), DECODE_CASES
)
def test_decode_attention_matches_ref(
    spec_text: str, num_kv_heads: int, head_dim: int, block_size: int, group: int, num_splits: int, dtype: torch.dtype
) -> None:
    spec = parse_kv_dtype(spec_text, torch.float32)
    # Tables wider than needed, padded with block 0, as a graph bucket's are.
    layer, block_tables, context_lens = _stored_batch(spec, CONTEXT_LENS, num_kv_heads, head_dim, block_size,
                                                      max_blocks=256 // block_size)  # fmt: skip
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
    layer, block_tables, lens = _stored_batch(KVSpec(KVFormat.INT8, KVFormat.INT8), context_lens, 1, 40, 16,
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
    layer, block_tables, lens = _stored_batch(KVSpec(KVFormat.FP32, KVFormat.FP32), [3], 2, 8, 4)
    with pytest.raises(ValueError, match="multiple"):
        paged_decode_attention(torch.randn(1, 3, 8, device=DEVICE), layer, block_tables, lens, 1.0)
    with pytest.raises(ValueError, match="head_dim"):
        paged_decode_attention(torch.randn(1, 2, 16, device=DEVICE), layer, block_tables, lens, 1.0)
    odd, tables, odd_lens = _stored_batch(KVSpec(KVFormat.FP32, KVFormat.FP32), [3], 2, 8, 5)
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
@pytest.mark.parametrize("spec_text", ["bf16", "int8", "fp8", "k=int8,v=bf16"])
def test_store_kv_gpu_real_sizes(spec_text: str) -> None:
    spec = parse_kv_dtype(spec_text, torch.bfloat16)
    num_blocks, num_tokens = 600, 8000
    key = torch.randn(num_tokens, GPU_KV_HEADS, GPU_HEAD_DIM, device=DEVICE, dtype=torch.bfloat16) * 4
    value = torch.randn_like(key)
    slots = torch.randperm(num_blocks * GPU_BLOCK, device=DEVICE)[:num_tokens]
    slots[::97] = -1
    expected = _pool(spec, num_blocks, GPU_BLOCK, GPU_KV_HEADS, GPU_HEAD_DIM, seed=4)
    actual = _pool(spec, num_blocks, GPU_BLOCK, GPU_KV_HEADS, GPU_HEAD_DIM, seed=4)
    store_kv_ref(key, value, expected.layer(LAYER), slots)
    store_kv(key, value, actual.layer(LAYER), slots)
    _assert_same_bytes(expected, actual)


@pytest.mark.gpu
@pytest.mark.parametrize("spec_text", ["bf16", "int8"])
@pytest.mark.parametrize("num_splits", [None, 1])
def test_decode_attention_gpu_real_sizes(spec_text: str, num_splits: int | None) -> None:
    spec = parse_kv_dtype(spec_text, torch.bfloat16)
    lens = _gpu_lens(seed=0)
    layer, block_tables, context_lens = _stored_batch(spec, lens, GPU_KV_HEADS, GPU_HEAD_DIM, GPU_BLOCK,
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
    layer, block_tables, context_lens = _stored_batch(spec, full, GPU_KV_HEADS, GPU_HEAD_DIM, GPU_BLOCK,
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

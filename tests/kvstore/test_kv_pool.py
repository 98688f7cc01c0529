"""The KV pool's buffer layout, the block allocator and block-table helpers."""

from __future__ import annotations

import pytest
import torch

from kvstore.allocator import BlockAllocator, OutOfBlocks
from kvstore.block_table import blocks_needed, make_block_table_tensor, slot_mapping
from kvstore.formats import KVFormat, KVSpec, bytes_per_token, parse_kv_dtype
from kvstore.pool import ALIGNMENT, KVPool, PoolGeometry

SPECS = ["bf16", "fp32", "int8", "fp8", "k=int8,v=bf16", "k=bf16,v=fp8"]


@pytest.mark.parametrize("spec_text", SPECS)
@pytest.mark.parametrize(("num_kv_heads", "head_dim", "block_size"), [(1, 40, 1), (3, 64, 5), (2, 40, 16)])
def test_pool_views(spec_text: str, num_kv_heads: int, head_dim: int, block_size: int) -> None:
    spec = parse_kv_dtype(spec_text, torch.bfloat16)
    geometry = PoolGeometry(
        num_layers=3, num_blocks=7, block_size=block_size, num_kv_heads=num_kv_heads, head_dim=head_dim
    )
    pool = KVPool.allocate(geometry, spec, "cpu")
    assert pool.buffer.dtype == torch.uint8 and pool.buffer.numel() == KVPool.nbytes(geometry, spec)
    shape = (3, 7, block_size, num_kv_heads, head_dim)
    assert pool.k_cache.shape == shape and pool.k_cache.dtype == spec.k.storage_dtype
    assert pool.v_cache.shape == shape and pool.v_cache.dtype == spec.v.storage_dtype
    for fmt, scale in ((spec.k, pool.k_scale), (spec.v, pool.v_scale)):
        if fmt.has_scale:
            assert scale is not None and scale.shape == shape[:-1] and scale.dtype == torch.float32
        else:
            assert scale is None

    base = pool.buffer.data_ptr()
    views = [t for t in (pool.k_cache, pool.v_cache, pool.k_scale, pool.v_scale) if t is not None]
    spans = []
    for t in views:
        assert t.is_contiguous()
        # Every view lives inside the one buffer, at an aligned offset.
        assert t.untyped_storage().data_ptr() == pool.buffer.untyped_storage().data_ptr()
        offset = t.data_ptr() - base
        assert offset % ALIGNMENT == 0
        spans.append((offset, offset + t.numel() * t.element_size()))
    spans.sort()
    assert all(a_end <= b_start for (_, a_end), (b_start, _) in zip(spans, spans[1:], strict=False))
    assert spans[-1][1] <= pool.buffer.numel()

    # The data itself is exactly bytes_per_block per block; padding is less than one ALIGNMENT per region.
    assert pool.bytes_per_block == block_size * bytes_per_token(spec, 3, num_kv_heads, head_dim)
    assert 0 <= pool.buffer.numel() - 7 * pool.bytes_per_block < ALIGNMENT * len(views)


def test_views_share_memory_and_layers() -> None:
    spec = KVSpec(KVFormat.INT8, KVFormat.BF16)
    geometry = PoolGeometry(num_layers=2, num_blocks=4, block_size=3, num_kv_heads=2, head_dim=8)
    pool = KVPool.allocate(geometry, spec, "cpu")
    # A second pool over the same bytes (what another process does after mapping the buffer) sees every write.
    other = KVPool.from_buffer(geometry, spec, pool.buffer)
    layer = pool.layer(1)
    layer.k_cache[2, 1, 0] = 5
    layer.v_cache[3, 2, 1] = 1.5
    assert layer.k_scale is not None and layer.v_scale is None
    layer.k_scale[0, 0, 1] = 0.25
    assert other.k_cache[1, 2, 1, 0].eq(5).all()
    assert other.v_cache[1, 3, 2, 1].eq(1.5).all()
    assert other.k_scale is not None and other.k_scale[1, 0, 0, 1] == 0.25
    assert pool.k_cache[0].eq(0).all()  # layer 0 untouched
    assert layer.k_format is KVFormat.INT8 and layer.v_format is KVFormat.BF16
    assert (layer.num_blocks, layer.block_size, layer.num_kv_heads, layer.head_dim) == (4, 3, 2, 8)
    with pytest.raises(IndexError):
        pool.layer(2)


def test_from_buffer_checks() -> None:
    spec = KVSpec(KVFormat.FP8, KVFormat.FP8)
    geometry = PoolGeometry(num_layers=1, num_blocks=2, block_size=4, num_kv_heads=1, head_dim=16)
    need = KVPool.nbytes(geometry, spec)
    with pytest.raises(ValueError, match="bytes"):
        KVPool.from_buffer(geometry, spec, torch.zeros(need - 1, dtype=torch.uint8))
    with pytest.raises(ValueError, match="uint8"):
        KVPool.from_buffer(geometry, spec, torch.zeros(need, dtype=torch.int8))
    # A larger buffer (a /dev/shm file rounded up to pages) is fine.
    pool = KVPool.from_buffer(geometry, spec, torch.zeros(need + 4096, dtype=torch.uint8))
    assert pool.k_cache.shape == geometry.cache_shape
    with pytest.raises(ValueError):
        PoolGeometry(num_layers=1, num_blocks=0, block_size=4, num_kv_heads=1, head_dim=16)


def test_allocator_basic_and_atomic() -> None:
    alloc = BlockAllocator(10)
    a = alloc.allocate(4)
    assert a == [0, 1, 2, 3]
    assert (alloc.num_free(), alloc.num_used()) == (6, 4)
    with pytest.raises(OutOfBlocks) as info:
        alloc.allocate(7)
    assert (info.value.needed, info.value.free) == (7, 6)
    # Nothing was taken by the failed call.
    assert (alloc.num_free(), alloc.num_used()) == (6, 4)
    b = alloc.allocate(6)
    assert sorted(a + b) == list(range(10))
    assert alloc.allocate(0) == []
    alloc.free(a)
    assert (alloc.num_free(), alloc.num_used()) == (4, 6)
    # Freed blocks are reused last-in-last-out of the free list (FIFO), all of them available again.
    assert sorted(alloc.allocate(4)) == a


def test_allocator_rejects_bad_frees() -> None:
    alloc = BlockAllocator(5)
    blocks = alloc.allocate(3)
    alloc.free(blocks[:1])
    with pytest.raises(ValueError, match="double free"):
        alloc.free(blocks[:1])
    with pytest.raises(ValueError, match="not a block id"):
        alloc.free([5])
    with pytest.raises(ValueError, match="not a block id"):
        alloc.free([-1])
    # A repeated id within one call is a double free too, and the call frees nothing.
    with pytest.raises(ValueError, match="double free"):
        alloc.free([blocks[1], blocks[1]])
    # Never-allocated ids cannot be freed, and a bad id fails the whole call atomically.
    with pytest.raises(ValueError):
        alloc.free([blocks[2], 4])
    assert (alloc.num_free(), alloc.num_used()) == (3, 2)
    with pytest.raises(ValueError):
        alloc.allocate(-1)


def test_allocator_shuffle() -> None:
    a = BlockAllocator(64, shuffle_seed=1).allocate(64)
    assert sorted(a) == list(range(64)) and a != list(range(64))
    assert BlockAllocator(64, shuffle_seed=1).allocate(64) == a
    assert BlockAllocator(64, shuffle_seed=2).allocate(64) != a


def test_block_table_helpers() -> None:
    assert [blocks_needed(n, 5) for n in (0, 1, 5, 6, 10, 11)] == [0, 1, 1, 2, 2, 3]
    assert blocks_needed(7, 1) == 7
    table = [7, 2, 9]
    assert slot_mapping(table, 0, 12, 4) == [28, 29, 30, 31, 8, 9, 10, 11, 36, 37, 38, 39]
    assert slot_mapping(table, 5, 7, 4) == [9, 10]
    assert slot_mapping(table, 3, 3, 4) == []
    with pytest.raises(ValueError):
        slot_mapping(table, 0, 13, 4)
    t = make_block_table_tensor([[3, 1], [], [4, 5, 6]], "cpu")
    assert t.dtype == torch.int32
    assert t.tolist() == [[3, 1, 0], [0, 0, 0], [4, 5, 6]]
    assert make_block_table_tensor([[1]], "cpu", max_blocks=4).tolist() == [[1, 0, 0, 0]]
    assert make_block_table_tensor([], "cpu").shape == (0, 1)
    with pytest.raises(ValueError):
        make_block_table_tensor([[1, 2, 3]], "cpu", max_blocks=2)

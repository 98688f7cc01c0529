"""What the kernel tests build their inputs from: random pools, sequences stored in them, Llama 3.1's rotary
scaling."""

from __future__ import annotations

import torch

from kernels.store_kv import store_kv_ref
from kvstore.allocator import BlockAllocator
from kvstore.block_table import blocks_needed, make_block_table_tensor, slot_mapping
from kvstore.formats import KVSpec, LayerKV, parse_kv_dtype
from kvstore.pool import KVPool, PoolGeometry

# Where random_pool and stored_batch put their tensors: interpreted kernels read CPU tensors.
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
NUM_LAYERS = 2
LAYER = 1  # write and read the second layer, so a layer-offset bug shows

LLAMA31 = {
    "rope_type": "llama3",
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 8192,
}


# A test's spec text may end in FNUZ ("fp8+fnuz", "k=int8,v=fp8+fnuz"): its fp8 K/V then stored as e4m3fnuz (MI300X's
# fp8, max 240) whatever this platform's (e4m3fn on the CPU and NVIDIA), through the pool's `fp8` parameter.
FNUZ = "+fnuz"


def parse_spec(text: str, model_dtype: torch.dtype = torch.float32) -> tuple[KVSpec, torch.dtype | None]:
    """(KVSpec, the pool's forced fp8 flavour or None) of a test's spec text (`FNUZ`). An e4m3fnuz case is skipped on an
    NVIDIA GPU, which has no such fp8 (it runs under the interpreter on the CPU and on ROCm)."""
    if text.endswith(FNUZ):
        if DEVICE == "cuda" and torch.version.hip is None:
            import pytest

            pytest.skip("e4m3fnuz is MI300X's fp8: no NVIDIA GPU converts it")
        return parse_kv_dtype(text.removesuffix(FNUZ), model_dtype), torch.float8_e4m3fnuz
    return parse_kv_dtype(text, model_dtype), None


def random_pool(spec: KVSpec, num_blocks: int, block_size: int, num_kv_heads: int, head_dim: int, seed: int,
                fp8: torch.dtype | None = None) -> KVPool:  # fmt: skip
    """A pool whose bytes are random (identical for the same seed), so that a kernel writing where the reference
    does not, or writing zeros, shows up. fp8: its fp8 flavour (`KVPool.allocate`), default this platform's."""
    geometry = PoolGeometry(NUM_LAYERS, num_blocks, block_size, num_kv_heads, head_dim)
    pool = KVPool.allocate(geometry, spec, DEVICE, fp8)
    g = torch.Generator().manual_seed(seed)
    pool.buffer.copy_(torch.randint(0, 256, pool.buffer.shape, dtype=torch.uint8, generator=g))
    if spec.k.has_scale or spec.v.has_scale:
        # Random bytes in a scale region could be NaN/inf; keep the scales finite so that unwritten ones compare.
        for scales in (pool.k_scale, pool.v_scale):
            if scales is not None:
                scales.copy_(torch.rand(scales.shape, generator=g))
    return pool


def stored_batch(
    spec: KVSpec,
    context_lens: list[int],
    num_kv_heads: int,
    head_dim: int,
    block_size: int,
    dtype: torch.dtype = torch.float32,
    max_blocks: int | None = None,
    seed: int = 0,
    spare: int = 3,
    fp8: torch.dtype | None = None,
) -> tuple[LayerKV, torch.Tensor, torch.Tensor]:
    """K/V of every sequence stored with store_kv_ref into blocks from a shuffled allocator (and `spare` blocks more).
    Returns (layer, block_tables [num_seqs, max_blocks] int32, context_lens [num_seqs] int32). fp8: `random_pool`'s."""
    need = sum(blocks_needed(n, block_size) for n in context_lens)
    pool = random_pool(spec, need + spare, block_size, num_kv_heads, head_dim, seed=seed, fp8=fp8)
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

"""The Triton store_kv (kernels/triton_store_kv.py) against store_kv_ref: the same bytes, data and scales, for every
format, and nothing written anywhere else.

Without a GPU it runs under TRITON_INTERPRET=1 (conftest.py sets it) at small, odd sizes; with one, the same tests
run on the GPU, and the `gpu` test adds real sizes.
"""

from __future__ import annotations

import pytest
import torch

triton = pytest.importorskip("triton", reason="triton is not installed (pip install triton): no Triton kernel to test")

from kernels.store_kv import store_kv_ref  # noqa: E402
from kernels.triton_store_kv import store_kv  # noqa: E402
from kvstore.formats import KVFormat, KVSpec, parse_kv_dtype  # noqa: E402
from kvstore.pool import KVPool, PoolGeometry  # noqa: E402
from tests.kernels.close import assert_same_kv  # noqa: E402
from tests.kernels.inputs import DEVICE, LAYER, parse_spec, random_pool  # noqa: E402


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
    ("fp8+fnuz", torch.float32, 3, 40, 16),  # MI300X's e4m3fnuz (tests/kernels/inputs.py FNUZ)
    ("fp8+fnuz", torch.bfloat16, 3, 64, 4),
    ("k=int8,v=bf16", torch.float32, 3, 40, 4),
]


@pytest.mark.parametrize(("spec_text", "dtype", "num_kv_heads", "head_dim", "block_size"), STORE_CASES)
def test_store_kv_matches_ref(
    spec_text: str, dtype: torch.dtype, num_kv_heads: int, head_dim: int, block_size: int
) -> None:
    spec, fp8 = parse_spec(spec_text)
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

    expected = random_pool(spec, num_blocks, block_size, num_kv_heads, head_dim, seed=2, fp8=fp8)
    actual = random_pool(spec, num_blocks, block_size, num_kv_heads, head_dim, seed=2, fp8=fp8)
    if fp8 is not None:
        assert expected.layer(LAYER).k_cache.dtype == torch.float8_e4m3fnuz
    store_kv_ref(key, value, expected.layer(LAYER), slots)
    store_kv(key, value, actual.layer(LAYER), slots)
    assert_same_kv(expected, actual)


def test_store_kv_non_contiguous_input() -> None:
    """key/value as views (e.g. slices of a fused qkv projection) are read through their strides."""
    spec = KVSpec(KVFormat.INT8, KVFormat.BF16)
    qkv = torch.randn(7, 5, 2, 40, device=DEVICE)
    key, value = qkv[:, 1], qkv[:, 3]
    slots = torch.tensor([9, 0, -1, 3, 17, 4, 2], device=DEVICE)
    expected = random_pool(spec, 5, 4, 2, 40, seed=3)
    actual = random_pool(spec, 5, 4, 2, 40, seed=3)
    store_kv_ref(key, value, expected.layer(LAYER), slots)
    store_kv(key, value, actual.layer(LAYER), slots)
    assert_same_kv(expected, actual)


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
# GPU, real sizes: 8 KV heads, head_dim 128, block size 16 (as the decode attention tests).

GPU_KV_HEADS, GPU_HEAD_DIM, GPU_BLOCK = 8, 128, 16


@pytest.mark.gpu
@pytest.mark.parametrize("spec_text", ["bf16", "int8", "fp8", "k=int8,v=bf16"])
def test_store_kv_gpu_real_sizes(spec_text: str) -> None:
    spec = parse_kv_dtype(spec_text, torch.bfloat16)
    num_blocks, num_tokens = 600, 8000
    key = torch.randn(num_tokens, GPU_KV_HEADS, GPU_HEAD_DIM, device=DEVICE, dtype=torch.bfloat16) * 4
    value = torch.randn_like(key)
    slots = torch.randperm(num_blocks * GPU_BLOCK, device=DEVICE)[:num_tokens]
    slots[::97] = -1
    expected = random_pool(spec, num_blocks, GPU_BLOCK, GPU_KV_HEADS, GPU_HEAD_DIM, seed=4)
    actual = random_pool(spec, num_blocks, GPU_BLOCK, GPU_KV_HEADS, GPU_HEAD_DIM, seed=4)
    store_kv_ref(key, value, expected.layer(LAYER), slots)
    store_kv(key, value, actual.layer(LAYER), slots)
    assert_same_kv(expected, actual)

"""The fused Triton rotary_store_kv (kernels/triton_rotary_store_kv.py) against the unfused path: the same query bits
and the same pool bytes as rotary_store_kv_ref (interpreted), or as the rotary and store_kv kernels in sequence (on a
GPU).

Without a GPU it runs under TRITON_INTERPRET=1 (tests/conftest.py sets it) at small, odd sizes; the `gpu` test
repeats the check at Llama-3-8B's attention shape.
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


from kernels.rotary import compute_inv_freq, make_cos_sin_cache  # noqa: E402
from kernels.rotary_store_kv import rotary_store_kv_ref  # noqa: E402
from kernels.triton_rotary import rotary  # noqa: E402
from kernels.triton_rotary_store_kv import rotary_store_kv  # noqa: E402
from kernels.triton_store_kv import store_kv  # noqa: E402
from kvstore.block_table import blocks_needed  # noqa: E402
from kvstore.formats import parse_kv_dtype  # noqa: E402
from kvstore.pool import KVPool, PoolGeometry  # noqa: E402
from tests.kernels.close import assert_same_kv  # noqa: E402
from tests.kernels.inputs import LLAMA31  # noqa: E402

# Interpreted kernels read CPU tensors; on a GPU machine the small tests run on the GPU too.
DEVICE = "cuda" if HAS_GPU and not INTERPRET else "cpu"


def _rotary_store_kv_inputs(
    spec_text: str, dtype: torch.dtype, num_tokens: int, num_heads: int, num_kv_heads: int, head_dim: int,
    rot_dim: int, block_size: int, device: str = DEVICE, max_positions: int = 3000, seed: int = 0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, KVPool, KVPool]:  # fmt: skip
    """(qkv [num_tokens, heads + 2 * kv heads, head_dim], positions, slots with padding, Llama-3.1 cos/sin cache,
    and two identical pools of finite garbage: the first for the expected result, the second for the kernel's)."""
    g = torch.Generator().manual_seed(seed)
    # Different magnitudes per kv head, so per-head scales matter.
    gain = torch.cat([torch.ones(num_heads), torch.logspace(-1, 1, num_kv_heads), torch.full((num_kv_heads,), 2.0)])
    qkv = torch.randn(num_tokens, num_heads + 2 * num_kv_heads, head_dim, generator=g) * gain[:, None]
    qkv = qkv.to(device, dtype)
    positions = torch.randint(0, max_positions, (num_tokens,), generator=g)
    positions[: min(2, num_tokens)] = 0  # position 0: the identity rotation
    num_blocks = blocks_needed(num_tokens, block_size) + 2
    slots = torch.randperm(num_blocks * block_size, generator=g)[:num_tokens]
    if num_tokens > 2:
        slots[[1, num_tokens - 2]] = -1
    cache = make_cos_sin_cache(compute_inv_freq(rot_dim, 500000.0, LLAMA31), max_positions, torch.float32)
    spec = parse_kv_dtype(spec_text, dtype)
    geometry = PoolGeometry(2, num_blocks, block_size, num_kv_heads, head_dim)
    pools = [KVPool.allocate(geometry, spec, device) for _ in range(2)]
    garbage = torch.randint(0, 100, pools[0].buffer.shape, dtype=torch.uint8, generator=g)
    for pool in pools:
        pool.buffer.copy_(garbage)
    return qkv, positions.to(device), slots.to(device), cache.to(device), pools[0], pools[1]


def _split_qkv(qkv: torch.Tensor, num_heads: int, num_kv_heads: int):
    # Strided views, as out of the fused projection.
    return qkv[:, :num_heads], qkv[:, num_heads : num_heads + num_kv_heads], qkv[:, num_heads + num_kv_heads :]


ROTARY_STORE_CASES = [
    # (num_tokens, num_heads, num_kv_heads, head_dim, rot_dim, block_size)
    (1, 4, 2, 64, 64, 16),  # a decode step
    (11, 6, 3, 40, 40, 5),  # prefill-sized, padding slots, GQA 2, head_dim not a power of two
    (7, 5, 1, 72, 32, 4),  # partial rotary, one kv head
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("spec_text", ["int8", "fp8", "bf16", "fp16", "k=int8,v=bf16"])
@pytest.mark.parametrize(("num_tokens", "num_heads", "num_kv_heads", "head_dim", "rot_dim", "block_size"),
                         ROTARY_STORE_CASES)  # fmt: skip
def test_rotary_store_kv_matches_unfused(
    num_tokens: int, num_heads: int, num_kv_heads: int, head_dim: int, rot_dim: int, block_size: int,
    spec_text: str, dtype: torch.dtype,
) -> None:  # fmt: skip
    """Same bits as the unfused path: the references in sequence under the interpreter (which has no fused
    multiply-add), the two Triton kernels in sequence on a GPU (bf16 too: there the casts round to nearest even)."""
    qkv, positions, slots, cache, expected, actual = _rotary_store_kv_inputs(
        spec_text, dtype, num_tokens, num_heads, num_kv_heads, head_dim, rot_dim, block_size
    )
    before = qkv.clone()
    query, key, value = _split_qkv(qkv, num_heads, num_kv_heads)
    q_out = rotary_store_kv(positions, query, key, value, cache, actual.layer(1), slots)
    assert torch.equal(qkv, before)  # out of place: neither the query nor the key is written back
    assert q_out.dtype == dtype and q_out.shape == query.shape
    if INTERPRET:
        q_ref = rotary_store_kv_ref(positions, query, key, value, cache, expected.layer(1), slots)
    else:
        q_ref, k_rotated = rotary(positions, query, key, cache)
        store_kv(k_rotated, value, expected.layer(1), slots)
    assert torch.equal(q_out, q_ref)
    assert_same_kv(expected, actual)


@pytest.mark.skipif(not INTERPRET, reason="the interpreter's own check; a GPU compares with the kernels above")
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_rotary_store_kv_matches_interpreted_kernels(dtype: torch.dtype) -> None:
    """Also the two Triton kernels in sequence, interpreted (not bf16: the interpreter's bf16 cast truncates)."""
    qkv, positions, slots, cache, expected, actual = _rotary_store_kv_inputs("int8", dtype, 9, 6, 2, 40, 40, 4)
    query, key, value = _split_qkv(qkv, 6, 2)
    q_ref, k_rotated = rotary(positions, query, key, cache)
    store_kv(k_rotated, value, expected.layer(1), slots)
    assert torch.equal(rotary_store_kv(positions, query, key, value, cache, actual.layer(1), slots), q_ref)
    assert_same_kv(expected, actual)


def test_rotary_store_kv_checks_and_empty() -> None:
    qkv, positions, slots, cache, _, pool = _rotary_store_kv_inputs("int8", torch.float32, 3, 4, 2, 40, 40, 4)
    query, key, value = _split_qkv(qkv, 4, 2)
    layer = pool.layer(1)
    with pytest.raises(ValueError):  # store_kv's contract: value's shape
        rotary_store_kv(positions, query, key, value[:, :1], cache, layer, slots)
    with pytest.raises(ValueError):
        rotary_store_kv(positions[:2], query, key, value, cache, layer, slots)
    with pytest.raises(ValueError):
        rotary_store_kv(positions, query[:2], key, value, cache, layer, slots)
    with pytest.raises(ValueError):  # odd rot_dim
        rotary_store_kv(positions, query, key, value, cache[:, :7], layer, slots)
    before = pool.buffer.clone()
    empty = rotary_store_kv(positions[:0], query[:0], key[:0], value[:0], cache, layer, slots[:0])
    assert empty.shape == (0, 4, 40) and torch.equal(pool.buffer, before)


# ---------------------------------------------------------------------------------------------------------------------
# GPU, real size


@pytest.mark.gpu
@pytest.mark.parametrize("num_tokens", [1, 64, 4096])
@pytest.mark.parametrize("spec_text", ["int8", "fp8", "bf16"])
def test_gpu_rotary_store_kv_real_size(spec_text: str, num_tokens: int) -> None:
    """Llama-3-8B's attention shape (32 heads over 8 kv heads, head_dim 128, bf16, Llama-3.1 rotary): the fused
    kernel writes the same query and pool bytes as the rotary and store_kv kernels in sequence."""
    qkv, positions, slots, cache, expected, actual = _rotary_store_kv_inputs(
        spec_text, torch.bfloat16, num_tokens, 32, 8, 128, 128, 16, device="cuda", max_positions=131072
    )
    query, key, value = _split_qkv(qkv, 32, 8)
    q_ref, k_rotated = rotary(positions, query, key, cache)
    store_kv(k_rotated, value, expected.layer(1), slots)
    q_out = rotary_store_kv(positions, query, key, value, cache, actual.layer(1), slots)
    assert torch.equal(q_out, q_ref)
    assert_same_kv(expected, actual)

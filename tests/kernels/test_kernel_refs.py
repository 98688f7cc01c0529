"""Torch kernel references against independent, dense implementations (and against HF transformers where the model's
math comes from). The Triton kernels are later tested against these references.

Attention: K/V go through store_kv_ref into a pool whose block ids come from a shuffled allocator; the paged refs
must equal plain dense attention over contiguous K/V, quantize-dequantized the same way, for every format.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import pytest
import torch
import torch.nn.functional as F

from kernels.activation import silu_and_mul_ref
from kernels.decode_attention import paged_decode_attention_ref
from kernels.norm import fused_add_rms_norm_ref, rms_norm_ref
from kernels.prefill_attention import paged_prefill_attention_ref
from kernels.rotary import compute_inv_freq, make_cos_sin_cache, rotary_ref
from kernels.store_kv import store_kv_ref
from kvstore.allocator import BlockAllocator
from kvstore.block_table import blocks_needed, make_block_table_tensor, slot_mapping
from kvstore.formats import KVFormat, KVSpec, LayerKV, dequantize, parse_kv_dtype, quantize
from kvstore.pool import KVPool, PoolGeometry
from tests.kernels.close import rel_error
from tests.kernels.inputs import LLAMA31

SPECS = ["bf16", "fp16", "fp32", "int8", "fp8", "k=int8,v=bf16"]
NUM_LAYERS = 2
LAYER = 1  # write and read the second layer, so a layer-offset bug shows


@dataclass(frozen=True)
class Batch:
    """Sequences stored in a pool: per sequence the raw K/V of all its tokens and its block table."""

    pool: KVPool
    keys: list[torch.Tensor]  # each [context_len, num_kv_heads, head_dim]
    values: list[torch.Tensor]
    block_tables: torch.Tensor  # [num_seqs, max_blocks] int32
    context_lens: torch.Tensor  # [num_seqs] int32


def _store_batch(
    spec: KVSpec,
    context_lens: list[int],
    stored_first: list[int],
    num_kv_heads: int,
    head_dim: int,
    block_size: int,
    dtype: torch.dtype,
    seed: int = 0,
) -> Batch:
    """Store every sequence's K/V in two store_kv calls (a cached prefix of stored_first[b] tokens, then the rest),
    with padding tokens (slot -1) mixed in, into blocks from a shuffled allocator."""
    g = torch.Generator().manual_seed(seed)
    need = sum(blocks_needed(n, block_size) for n in context_lens)
    num_blocks = need + 3
    geometry = PoolGeometry(NUM_LAYERS, num_blocks, block_size, num_kv_heads, head_dim)
    pool = KVPool.allocate(geometry, spec, "cpu")
    allocator = BlockAllocator(num_blocks, shuffle_seed=seed + 1)
    tables = [allocator.allocate(blocks_needed(n, block_size)) for n in context_lens]
    keys = [torch.randn(n, num_kv_heads, head_dim, generator=g).to(dtype) for n in context_lens]
    values = [torch.randn(n, num_kv_heads, head_dim, generator=g).to(dtype) for n in context_lens]
    # Give heads different magnitudes so per-head scales matter.
    head_gain = torch.logspace(-1, 1, num_kv_heads)[:, None].to(dtype)
    keys = [k * head_gain for k in keys]
    layer = pool.layer(LAYER)
    for phase in range(2):
        ks, vs, slots = [], [], []
        for b, n in enumerate(context_lens):
            start, end = (0, stored_first[b]) if phase == 0 else (stored_first[b], n)
            ks.append(keys[b][start:end])
            vs.append(values[b][start:end])
            slots += slot_mapping(tables[b], start, end, block_size)
            # a padding token after each sequence's chunk
            ks.append(torch.full((1, num_kv_heads, head_dim), 99.0, dtype=dtype))
            vs.append(torch.full((1, num_kv_heads, head_dim), 99.0, dtype=dtype))
            slots.append(-1)
        store_kv_ref(torch.cat(ks), torch.cat(vs), layer, torch.tensor(slots, dtype=torch.int64))
    return Batch(
        pool=pool,
        keys=keys,
        values=values,
        block_tables=make_block_table_tensor(tables, "cpu"),
        context_lens=torch.tensor(context_lens, dtype=torch.int32),
    )


def _round_trip(x: torch.Tensor, fmt: KVFormat) -> torch.Tensor:
    data, scale = quantize(x, fmt)
    return dequantize(data, scale, fmt, torch.float32)


def _dense_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float, q_start: int | None
) -> torch.Tensor:
    """Plain SDPA on contiguous K/V. q [q_len, num_heads, head_dim], k/v [n, num_kv_heads, head_dim], float32.
    q_start: absolute position of q's first token (causal), or None for no mask (decode)."""
    group = q.shape[1] // k.shape[1]
    # [heads, tokens, head_dim]
    qh = q.float().transpose(0, 1)
    kh = k.repeat_interleave(group, dim=1).transpose(0, 1)
    vh = v.repeat_interleave(group, dim=1).transpose(0, 1)
    mask = None
    if q_start is not None:
        q_pos = torch.arange(q_start, q_start + q.shape[0])
        mask = torch.arange(k.shape[0])[None, :] <= q_pos[:, None]
    out = F.scaled_dot_product_attention(qh, kh, vh, attn_mask=mask, scale=scale)
    return out.transpose(0, 1)


# ---------------------------------------------------------------------------------------------------------------------
# store_kv


@pytest.mark.parametrize("spec_text", SPECS)
@pytest.mark.parametrize("block_size", [1, 5, 16])
def test_store_kv_writes_quantized_rows(spec_text: str, block_size: int) -> None:
    spec = parse_kv_dtype(spec_text, torch.float32)
    batch = _store_batch(spec, [3, 11], [1, 6], num_kv_heads=3, head_dim=40, block_size=block_size, dtype=torch.float32)
    layer = batch.pool.layer(LAYER)
    for b, n in enumerate(batch.context_lens.tolist()):
        table = batch.block_tables[b].tolist()
        slots = torch.tensor(slot_mapping(table, 0, n, block_size))
        for cache, scales, raw, fmt in (
            (layer.k_cache, layer.k_scale, batch.keys[b], spec.k),
            (layer.v_cache, layer.v_scale, batch.values[b], spec.v),
        ):
            data, scale = quantize(raw, fmt)
            stored = cache.view(-1, *cache.shape[2:])[slots]
            assert torch.equal(stored.view(torch.uint8), data.view(torch.uint8))
            if scale is None:
                assert scales is None
            else:
                assert scales is not None
                assert torch.equal(scales.view(-1, scales.shape[-1])[slots], scale)
    # Layer 0 was never written, and no padding token (value 99) landed anywhere.
    other = batch.pool.layer(0)
    assert other.k_cache.view(torch.uint8).eq(0).all() and other.v_cache.view(torch.uint8).eq(0).all()
    k_all, v_all = layer.gather(torch.arange(layer.num_blocks), layer.num_blocks * layer.block_size)
    assert k_all.abs().max() < 99 * 0.5 and v_all.abs().max() < 99 * 0.5


def test_store_kv_checks_shapes() -> None:
    pool = KVPool.allocate(PoolGeometry(1, 2, 4, 2, 8), KVSpec(KVFormat.INT8, KVFormat.INT8), "cpu")
    key = torch.randn(3, 2, 8)
    with pytest.raises(ValueError):
        store_kv_ref(key, key, pool.layer(0), torch.tensor([0, 1]))
    with pytest.raises(ValueError):
        store_kv_ref(key[:, :1], key[:, :1], pool.layer(0), torch.tensor([0, 1, 2]))


# ---------------------------------------------------------------------------------------------------------------------
# decode attention

ATTN_SHAPES = [
    # (num_kv_heads, head_dim, block_size, gqa group)
    (1, 40, 1, 1),
    (1, 64, 5, 3),
    (3, 40, 16, 1),
    (3, 64, 5, 3),
    (3, 40, 1, 3),
    (1, 64, 16, 1),
]


@pytest.mark.parametrize("spec_text", SPECS)
@pytest.mark.parametrize(("num_kv_heads", "head_dim", "block_size", "group"), ATTN_SHAPES)
def test_decode_attention_matches_dense(
    spec_text: str, num_kv_heads: int, head_dim: int, block_size: int, group: int
) -> None:
    spec = parse_kv_dtype(spec_text, torch.float32)
    context_lens = [1, 7, 23, 16, 0]  # the last one is batch padding
    batch = _store_batch(spec, context_lens, [n // 2 for n in context_lens], num_kv_heads, head_dim, block_size,
                         torch.float32)  # fmt: skip
    num_heads = num_kv_heads * group
    query = torch.randn(len(context_lens), num_heads, head_dim, generator=torch.Generator().manual_seed(5))
    scale = head_dim**-0.5
    out = paged_decode_attention_ref(query, batch.pool.layer(LAYER), batch.block_tables, batch.context_lens, scale)
    assert out.shape == query.shape and out.dtype == query.dtype
    for b, n in enumerate(context_lens):
        if n == 0:
            assert out[b].eq(0).all()
            continue
        k = _round_trip(batch.keys[b], spec.k)
        v = _round_trip(batch.values[b], spec.v)
        expected = _dense_attention(query[b : b + 1], k, v, scale, q_start=None)[0]
        torch.testing.assert_close(out[b], expected, atol=2e-5, rtol=2e-5)


@pytest.mark.parametrize(("spec_text", "tol"), [("int8", 0.04), ("fp8", 0.15), ("k=int8,v=bf16", 0.04)])
def test_quantized_decode_close_to_exact(spec_text: str, tol: float) -> None:
    """The quantized cache stays close to attention over the raw K/V (the dense test above shares `quantize`)."""
    spec = parse_kv_dtype(spec_text, torch.float32)
    context_lens = [9, 40]
    batch = _store_batch(spec, context_lens, [0, 0], 2, 64, 16, torch.float32)
    query = torch.randn(2, 4, 64, generator=torch.Generator().manual_seed(3))
    out = paged_decode_attention_ref(query, batch.pool.layer(LAYER), batch.block_tables, batch.context_lens, 0.125)
    for b in range(2):
        exact = _dense_attention(query[b : b + 1], batch.keys[b], batch.values[b], 0.125, None)[0]
        # relative error of the whole output: int8 ~2%, fp8 ~8% with these outlier-heavy keys
        rel = rel_error(out[b], exact)
        assert rel < tol


def test_decode_attention_bf16_query() -> None:
    spec = parse_kv_dtype("auto", torch.bfloat16)
    batch = _store_batch(spec, [5, 18], [0, 10], 3, 64, 5, torch.bfloat16)
    query = torch.randn(2, 9, 64).to(torch.bfloat16)
    out = paged_decode_attention_ref(query, batch.pool.layer(LAYER), batch.block_tables, batch.context_lens, 0.125)
    assert out.dtype == torch.bfloat16
    for b in range(2):
        expected = _dense_attention(query[b : b + 1], batch.keys[b].float(), batch.values[b].float(), 0.125, None)[0]
        torch.testing.assert_close(out[b].float(), expected, atol=1e-2, rtol=1e-2)


def test_decode_rejects_bad_gqa() -> None:
    pool = KVPool.allocate(PoolGeometry(1, 2, 4, 3, 8), KVSpec(KVFormat.BF16, KVFormat.BF16), "cpu")
    with pytest.raises(ValueError, match="multiple"):
        paged_decode_attention_ref(
            torch.randn(1, 4, 8), pool.layer(0), torch.zeros(1, 1, dtype=torch.int32), torch.ones(1), 1.0
        )


# ---------------------------------------------------------------------------------------------------------------------
# prefill attention

# (cached prefix, new tokens) per sequence: fresh prompts, chunked continuations, a single new token, an empty slot.
PREFILL_SEQS = [(0, 5), (7, 3), (0, 1), (12, 17), (4, 0), (3, 1)]


@pytest.mark.parametrize("spec_text", SPECS)
@pytest.mark.parametrize(("num_kv_heads", "head_dim", "block_size", "group"), ATTN_SHAPES)
def test_prefill_attention_matches_dense(
    spec_text: str, num_kv_heads: int, head_dim: int, block_size: int, group: int
) -> None:
    spec = parse_kv_dtype(spec_text, torch.float32)
    context_lens = [p + q for p, q in PREFILL_SEQS]
    q_lens = [q for _, q in PREFILL_SEQS]
    batch = _store_batch(spec, context_lens, [p for p, _ in PREFILL_SEQS], num_kv_heads, head_dim, block_size,
                         torch.float32, seed=7)  # fmt: skip
    num_heads = num_kv_heads * group
    query = torch.randn(sum(q_lens), num_heads, head_dim, generator=torch.Generator().manual_seed(11))
    cu_seqlens_q = torch.tensor([0, *torch.tensor(q_lens).cumsum(0).tolist()], dtype=torch.int32)
    scale = 1 / math.sqrt(head_dim)
    layer = batch.pool.layer(LAYER)
    out = paged_prefill_attention_ref(query, layer, batch.block_tables, cu_seqlens_q, batch.context_lens, scale)
    assert out.shape == query.shape and out.dtype == query.dtype
    for b, (prefix, q_len) in enumerate(PREFILL_SEQS):
        if q_len == 0:
            continue
        start, end = cu_seqlens_q[b].item(), cu_seqlens_q[b + 1].item()
        k = _round_trip(batch.keys[b], spec.k)
        v = _round_trip(batch.values[b], spec.v)
        expected = _dense_attention(query[start:end], k, v, scale, q_start=prefix)
        torch.testing.assert_close(out[start:end], expected, atol=2e-5, rtol=2e-5)

    # The last new token of a sequence sees exactly what a decode step at that position sees.
    last = cu_seqlens_q[1:].long() - 1
    has_new = torch.tensor(q_lens) > 0
    decode = paged_decode_attention_ref(query[last], layer, batch.block_tables, batch.context_lens, scale)
    torch.testing.assert_close(out[last][has_new], decode[has_new], atol=1e-5, rtol=1e-5)


def test_prefill_rejects_bad_cu_seqlens() -> None:
    pool = KVPool.allocate(PoolGeometry(1, 2, 4, 1, 8), KVSpec(KVFormat.BF16, KVFormat.BF16), "cpu")
    layer: LayerKV = pool.layer(0)
    tables = torch.zeros(1, 2, dtype=torch.int32)
    for cu in ([0, 4], [1, 3]):  # more rows than the query has, not starting at 0
        with pytest.raises(ValueError, match="cu_seqlens_q"):
            paged_prefill_attention_ref(torch.randn(3, 1, 8), layer, tables, torch.tensor(cu), torch.tensor([3]), 1.0)
    tables2 = torch.zeros(2, 2, dtype=torch.int32)
    with pytest.raises(ValueError, match="cu_seqlens_q"):  # not increasing
        paged_prefill_attention_ref(torch.randn(3, 1, 8), layer, tables2, torch.tensor([0, 2, 1]), torch.tensor([3, 3]),
                                    1.0)  # fmt: skip
    # Rows past the last sequence are padding (a prefill graph's bucket): they read nothing and come out 0.
    layer.v_cache.copy_(torch.randn(layer.v_cache.shape))
    out = paged_prefill_attention_ref(torch.randn(3, 1, 8), layer, tables, torch.tensor([0, 2]), torch.tensor([3]), 1.0)
    assert out[2].eq(0).all() and out[:2].ne(0).any()
    with pytest.raises(ValueError, match="new tokens"):
        paged_prefill_attention_ref(torch.randn(3, 1, 8), layer, tables, torch.tensor([0, 3]), torch.tensor([2]), 1.0)


# ---------------------------------------------------------------------------------------------------------------------
# norm, activation

transformers = pytest.importorskip("transformers")
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS  # noqa: E402
from transformers.models.llama.modeling_llama import (  # noqa: E402
    LlamaRMSNorm,
    LlamaRotaryEmbedding,
    apply_rotary_pos_emb,
)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("hidden", [40, 576])
def test_rms_norm_matches_hf(dtype: torch.dtype, hidden: int) -> None:
    g = torch.Generator().manual_seed(0)
    x = (torch.randn(13, hidden, generator=g) * 3).to(dtype)
    residual = torch.randn(13, hidden, generator=g).to(dtype)
    hf = LlamaRMSNorm(hidden, eps=1e-5).to(dtype)
    with torch.no_grad():
        hf.weight.copy_(torch.randn(hidden, generator=g))
        assert torch.equal(rms_norm_ref(x, hf.weight, 1e-5), hf(x))
        normed, new_residual = fused_add_rms_norm_ref(x, residual, hf.weight, 1e-5)
        assert torch.equal(new_residual, x + residual)
        assert torch.equal(normed, hf(x + residual))
    assert normed.dtype == dtype and new_residual.dtype == dtype


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_silu_and_mul(dtype: torch.dtype) -> None:
    x = torch.randn(2, 5, 2 * 48).to(dtype)
    out = silu_and_mul_ref(x)
    assert out.shape == (2, 5, 48) and out.dtype == dtype
    expected = F.silu(x.float()[..., :48]) * x.float()[..., 48:]
    torch.testing.assert_close(out.float(), expected, atol=1e-2 if dtype == torch.bfloat16 else 1e-6, rtol=1e-2)
    with pytest.raises(ValueError):
        silu_and_mul_ref(torch.randn(3, 7))


# ---------------------------------------------------------------------------------------------------------------------
# rotary

LLAMA32 = {**LLAMA31, "factor": 32.0}


def _hf_config(head_dim: int, rope_theta: float, rope_scaling: dict | None) -> transformers.LlamaConfig:
    rope_parameters = {"rope_type": "default", **(rope_scaling or {}), "rope_theta": rope_theta}
    return transformers.LlamaConfig(
        hidden_size=head_dim * 3,
        num_attention_heads=3,
        num_key_value_heads=1,
        head_dim=head_dim,
        max_position_embeddings=131072,
        rope_parameters=rope_parameters,
    )


@pytest.mark.parametrize("head_dim", [40, 64, 128])
@pytest.mark.parametrize(
    ("rope_theta", "rope_scaling"),
    [
        (10000.0, None),
        (100000, None),
        (500000.0, None),
        (500000.0, LLAMA31),
        (500000, LLAMA32),
        (10000.0, {"rope_type": "linear", "factor": 4.0}),
        (10000.0, {"type": "linear", "factor": 2.0}),
    ],
)
def test_inv_freq_matches_hf(head_dim: int, rope_theta: float, rope_scaling: dict | None) -> None:
    ours = compute_inv_freq(head_dim, rope_theta, rope_scaling)
    config = _hf_config(head_dim, rope_theta, rope_scaling)
    if rope_scaling is None:
        theirs, _ = LlamaRotaryEmbedding.compute_default_rope_parameters(config)
    else:
        rope_type = rope_scaling.get("rope_type", rope_scaling.get("type"))
        theirs, _ = ROPE_INIT_FUNCTIONS[rope_type](config)
    assert ours.dtype == torch.float32 and ours.shape == (head_dim // 2,)
    assert torch.equal(ours, theirs)


def test_inv_freq_rejects_unknown_scaling() -> None:
    with pytest.raises(ValueError, match="yarn"):
        compute_inv_freq(64, 10000.0, {"rope_type": "yarn", "factor": 4.0})


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("head_dim", [40, 64])
@pytest.mark.parametrize("rope_scaling", [None, LLAMA31])
def test_rotary_matches_hf(dtype: torch.dtype, head_dim: int, rope_scaling: dict | None) -> None:
    rope_theta = 500000.0
    max_positions = 20000
    g = torch.Generator().manual_seed(0)
    positions = torch.cat([torch.arange(7), torch.randint(0, max_positions, (9,), generator=g)])
    query = torch.randn(len(positions), 6, head_dim, generator=g).to(dtype)
    key = torch.randn(len(positions), 2, head_dim, generator=g).to(dtype)
    rope = LlamaRotaryEmbedding(_hf_config(head_dim, rope_theta, rope_scaling))
    inv_freq = compute_inv_freq(head_dim, rope_theta, rope_scaling)
    # Equal as test_inv_freq_matches_hf checks; the cache is built from HF's own copy so that this test compares the
    # cache and the rotation alone (at position 2e4 one ulp of inv_freq moves the angle by ~3e-4).
    torch.testing.assert_close(inv_freq, rope.inv_freq, atol=0, rtol=1e-6)
    cache = make_cos_sin_cache(rope.inv_freq, max_positions, dtype)
    assert cache.shape == (max_positions, head_dim) and cache.dtype == dtype
    q_out, k_out = rotary_ref(positions, query, key, cache)
    assert q_out.dtype == dtype and k_out.dtype == dtype

    # HF: [batch, seq, head_dim] cos/sin; q, k as [batch, seq, heads, head_dim] with unsqueeze_dim=2
    cos, sin = rope(query[None], positions[None])
    q_hf, k_hf = apply_rotary_pos_emb(query[None], key[None], cos, sin, unsqueeze_dim=2)
    if dtype == torch.float32:
        # HF forms the angles position x inv_freq with a matmul, we with a multiply: both one float32 product, but
        # CPU matmul kernels can differ (one clean-clone CI run differed by 4e-4 at a position near 2e4, where one
        # ulp of the angle is 2e-3 rad). Near positions hold to 1e-5; far ones to about an ulp times |q|.
        near = positions < 2048
        for ours, hf in ((q_out, q_hf[0]), (k_out, k_hf[0])):
            torch.testing.assert_close(ours[near], hf[near], atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(ours[~near], hf[~near], atol=5e-3, rtol=0)
    else:
        # HF rounds the two products to bf16 before adding; we add in float32 and round once.
        torch.testing.assert_close(q_out.float(), q_hf[0].float(), atol=3e-2, rtol=2e-2)
        torch.testing.assert_close(k_out.float(), k_hf[0].float(), atol=3e-2, rtol=2e-2)


def test_rotary_partial_leaves_tail() -> None:
    positions = torch.tensor([0, 3, 9])
    query = torch.randn(3, 2, 64)
    cache = make_cos_sin_cache(compute_inv_freq(32, 10000.0, None), 16, torch.float32)
    q_out, k_out = rotary_ref(positions, query, query[:, :1], cache)
    assert torch.equal(q_out[..., 32:], query[..., 32:])
    assert torch.equal(q_out[0], query[0])  # position 0 is the identity
    # A rotation keeps the norm of each pair.
    torch.testing.assert_close(q_out[..., :32].norm(dim=-1), query[..., :32].norm(dim=-1))
    torch.testing.assert_close(k_out, q_out[:, :1])

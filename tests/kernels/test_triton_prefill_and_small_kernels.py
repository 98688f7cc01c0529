"""Triton kernels against their torch references: paged_prefill_attention, rms_norm / fused_add_rms_norm, rotary,
silu_and_mul.

Without a GPU they run under TRITON_INTERPRET=1 (tests/conftest.py sets it) at small, odd sizes. The interpreter has
no usable bf16 (its bf16 tl.dot and int8->bf16 casts are wrong), so there fp32 stands in for bf16 and fp16 is the
half-precision case; bf16 runs on a GPU only. The `gpu` tests repeat the checks at real sizes.
"""

from __future__ import annotations

import math
import os
import random
from dataclasses import dataclass

import pytest
import torch

pytest.importorskip("triton", reason="triton is not installed: the Triton kernels cannot be tested")

HAS_GPU = torch.cuda.is_available()
INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
if not HAS_GPU and not INTERPRET:
    pytest.skip("no GPU and TRITON_INTERPRET is not 1: Triton kernels cannot run here", allow_module_level=True)


from kernels import triton_prefill_attention  # noqa: E402
from kernels.activation import silu_and_mul_ref  # noqa: E402
from kernels.norm import fused_add_rms_norm_ref, rms_norm_ref  # noqa: E402
from kernels.prefill_attention import paged_prefill_attention_ref  # noqa: E402
from kernels.rotary import compute_inv_freq, make_cos_sin_cache, rotary_ref  # noqa: E402
from kernels.rotary_store_kv import rotary_store_kv_ref  # noqa: E402
from kernels.store_kv import store_kv_ref  # noqa: E402
from kernels.triton_activation import silu_and_mul  # noqa: E402
from kernels.triton_norm import fused_add_rms_norm, rms_norm  # noqa: E402
from kernels.triton_prefill_attention import paged_prefill_attention  # noqa: E402
from kernels.triton_rotary import rotary  # noqa: E402
from kernels.triton_rotary_store_kv import rotary_store_kv  # noqa: E402
from kernels.triton_store_kv import store_kv  # noqa: E402
from kvstore.block_table import blocks_needed, make_block_table_tensor, slot_mapping  # noqa: E402
from kvstore.formats import parse_kv_dtype  # noqa: E402
from kvstore.pool import KVPool, LayerKV, PoolGeometry  # noqa: E402

# Interpreted kernels read CPU tensors; on a GPU machine the small tests run on the GPU too.
DEVICE = "cuda" if HAS_GPU and not INTERPRET else "cpu"
# "Full precision" KV and query: fp32 is the CPU stand-in for bf16 (the interpreter cannot do bf16).
HALF_DTYPES = [torch.float16] if INTERPRET else [torch.float16, torch.bfloat16]
needs_gpu_bf16 = pytest.mark.skipif(INTERPRET, reason="the Triton interpreter computes bf16 dots and casts wrongly")

LLAMA31 = {
    "rope_type": "llama3",
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 8192,
}


# ---------------------------------------------------------------------------------------------------------------------
# prefill attention


@dataclass(frozen=True)
class PrefillCase:
    layer: LayerKV
    query: torch.Tensor  # [num_tokens, num_heads, head_dim]
    block_tables: torch.Tensor  # [num_seqs, max_blocks] int32
    cu_seqlens_q: torch.Tensor  # [num_seqs + 1] int32
    context_lens: torch.Tensor  # [num_seqs] int32
    scale: float


def _prefill_case(
    spec_text: str,
    prefixes: list[int],
    q_lens: list[int],
    num_kv_heads: int,
    group: int,
    head_dim: int,
    block_size: int,
    query_dtype: torch.dtype = torch.float32,
    device: str = DEVICE,
    seed: int = 0,
) -> PrefillCase:
    """A pool (second of two layers, shuffled block ids, spare blocks of garbage) holding each sequence's prefix and
    new tokens, stored by two store_kv calls as a chunked prefill would, and the new tokens' queries."""
    g = torch.Generator().manual_seed(seed)
    spec = parse_kv_dtype(spec_text, torch.float32)
    context_lens = [p + q for p, q in zip(prefixes, q_lens, strict=True)]
    need = [blocks_needed(n, block_size) for n in context_lens]
    num_blocks = sum(need) + 3
    pool = KVPool.allocate(PoolGeometry(2, num_blocks, block_size, num_kv_heads, head_dim), spec, device)
    # Every byte of the pool starts as garbage (but finite): reading an unwritten slot shows in the output.
    pool.buffer.copy_(torch.randint(0, 100, pool.buffer.shape, dtype=torch.uint8, generator=g))
    ids = list(range(num_blocks))
    random.Random(seed).shuffle(ids)
    tables, start = [], 0
    for n in need:
        tables.append(ids[start : start + n])
        start += n
    layer = pool.layer(1)
    # Different magnitudes per kv head, so per-head scales matter.
    gain = torch.logspace(-0.5, 0.5, num_kv_heads)[:, None]
    for lo_of, hi_of in ((lambda b: 0, lambda b: prefixes[b]), (lambda b: prefixes[b], lambda b: context_lens[b])):
        ks, vs, slots = [], [], []
        for b in range(len(context_lens)):
            lo, hi = lo_of(b), hi_of(b)
            ks.append(torch.randn(hi - lo, num_kv_heads, head_dim, generator=g) * gain * 2)
            vs.append(torch.randn(hi - lo, num_kv_heads, head_dim, generator=g))
            slots += slot_mapping(tables[b], lo, hi, block_size)
        store_kv_ref(
            torch.cat(ks).to(device), torch.cat(vs).to(device), layer, torch.tensor(slots, dtype=torch.int64).to(device)
        )
    query = torch.randn(sum(q_lens), num_kv_heads * group, head_dim, generator=g).to(device, query_dtype)
    cu = torch.tensor([0, *torch.tensor(q_lens).cumsum(0).tolist()], dtype=torch.int32, device=device)
    return PrefillCase(
        layer=layer,
        query=query,
        block_tables=make_block_table_tensor(tables, device, max_blocks=max(need) + 2),
        cu_seqlens_q=cu,
        context_lens=torch.tensor(context_lens, dtype=torch.int32, device=device),
        scale=1 / math.sqrt(head_dim),
    )


def _run_both(case: PrefillCase, max_query_len: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    args = (case.query, case.layer, case.block_tables, case.cu_seqlens_q, case.context_lens, case.scale)
    out = paged_prefill_attention(*args, max_query_len=max_query_len)
    return out, paged_prefill_attention_ref(*args)


def _small_tiles(head_dim: int, max_query_len: int, dtype: torch.dtype, quantized_v: bool) -> tuple[int, int, int, int]:
    # 16 x 16 tiles: at these sizes every program then has full (unmasked) key tiles and sequences span several
    # query tiles, which the default 64+ tiles only reach at hundreds of tokens.
    return 16, 16, 4, 2


TILES = ["default", "16x16"]

# The brief's batch: cached prefixes 0, 5, 17 with 1, 7, 20 new tokens.
PREFIXES = [0, 5, 17]
Q_LENS = [1, 7, 20]


@pytest.mark.parametrize("tiles", TILES)
@pytest.mark.parametrize("block_size", [4, 16])
@pytest.mark.parametrize("group", [1, 3])
@pytest.mark.parametrize("head_dim", [40, 64])
@pytest.mark.parametrize("spec_text", ["fp32", "int8", "fp8", "k=int8,v=bf16"])
def test_prefill_matches_ref(
    spec_text: str, head_dim: int, group: int, block_size: int, tiles: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    if tiles != "default":
        monkeypatch.setattr(triton_prefill_attention, "_launch_config", _small_tiles)
    case = _prefill_case(spec_text, PREFIXES, Q_LENS, num_kv_heads=2, group=group, head_dim=head_dim,
                         block_size=block_size, seed=head_dim + group + block_size)  # fmt: skip
    out, ref = _run_both(case)
    assert out.shape == ref.shape and out.dtype == ref.dtype
    torch.testing.assert_close(out, ref, atol=2e-5, rtol=2e-5)


@pytest.mark.parametrize("tiles", TILES)
@pytest.mark.parametrize("query_dtype", HALF_DTYPES)
@pytest.mark.parametrize("spec_text", ["int8", "fp8", "fp16", "k=int8,v=bf16"])
def test_prefill_half_precision(
    spec_text: str, query_dtype: torch.dtype, tiles: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    if tiles != "default":
        monkeypatch.setattr(triton_prefill_attention, "_launch_config", _small_tiles)
    case = _prefill_case(spec_text, PREFIXES, Q_LENS, num_kv_heads=2, group=3, head_dim=40, block_size=16,
                         query_dtype=query_dtype)  # fmt: skip
    out, ref = _run_both(case, max_query_len=max(Q_LENS))
    assert out.dtype == query_dtype
    # Half-precision probabilities and values into the dots: ~1e-3 relative for fp16, ~8e-3 for bf16.
    tol = 5e-3 if query_dtype == torch.float16 else 3e-2
    torch.testing.assert_close(out.float(), ref.float(), atol=tol, rtol=tol)


@pytest.mark.parametrize("offsets_64", [False, True])
@pytest.mark.parametrize(("spec_text", "query_dtype"), [("fp32", torch.float32), ("int8", torch.float16)])
def test_prefill_long_prefix_default_tiles(
    spec_text: str, query_dtype: torch.dtype, offsets_64: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Past one key tile and one query tile with the default configuration (fp16: the 128 x 64 tiles bf16 uses): full
    tiles, several query tiles, one partly past its sequence, an empty sequence and a single-token one in the batch."""
    case = _prefill_case(spec_text, [150, 3, 9, 70], [140, 0, 1, 33], num_kv_heads=1, group=2, head_dim=64,
                         block_size=16, query_dtype=query_dtype)  # fmt: skip
    if offsets_64:
        # The int64 indexing of pools past 2**31 elements, on a small pool.
        monkeypatch.setattr(triton_prefill_attention, "OFFSETS_64_FROM", 0)
    out, ref = _run_both(case)
    tol = 2e-5 if query_dtype == torch.float32 else 5e-3
    torch.testing.assert_close(out.float(), ref.float(), atol=tol, rtol=tol)


def test_prefill_strided_query_and_checks() -> None:
    case = _prefill_case("int8", PREFIXES, Q_LENS, num_kv_heads=2, group=1, head_dim=40, block_size=4)
    # The query as a slice of a fused qkv projection: [num_tokens, 3 * num_heads, head_dim][:, :num_heads].
    qkv = torch.randn(case.query.shape[0], 3 * case.query.shape[1], 40, device=DEVICE)
    qkv[:, : case.query.shape[1]] = case.query
    strided = qkv[:, : case.query.shape[1]]
    args = (case.layer, case.block_tables, case.cu_seqlens_q, case.context_lens, case.scale)
    torch.testing.assert_close(paged_prefill_attention(strided, *args), paged_prefill_attention_ref(case.query, *args))
    with pytest.raises(ValueError, match="multiple"):
        paged_prefill_attention(case.query[:, :1].repeat(1, 3, 1), *args)
    with pytest.raises(ValueError, match="head_dim"):
        paged_prefill_attention(case.query[..., :32], *args)
    with pytest.raises(ValueError, match="cu_seqlens_q"):
        paged_prefill_attention(case.query, case.layer, case.block_tables, case.cu_seqlens_q[:-1],
                                case.context_lens, case.scale)  # fmt: skip


# ---------------------------------------------------------------------------------------------------------------------
# norm, activation, rotary

SMALL_DTYPES = [torch.float32, *HALF_DTYPES]


def _close_to_ulps(out: torch.Tensor, ref: torch.Tensor) -> None:
    """Equal but for rare differences of at most 2 ulps of x's dtype: the float32 sum of squares adds in another
    order (and torch's CUDA rsqrt is approximate), which can move the normalized value by one ulp, and the product
    with the weight by up to two. Measured on an H200 at [4096, 4096] bf16: ~1e-5 of elements differ, <= 1.6 ulps."""
    assert out.dtype == ref.dtype and out.shape == ref.shape
    if out.dtype == torch.float32:
        torch.testing.assert_close(out, ref, atol=1e-6, rtol=1e-6)
        return
    ulp = torch.finfo(out.dtype).eps * ref.float().abs().clamp_min(torch.finfo(out.dtype).tiny)
    assert ((out.float() - ref.float()).abs() <= 2 * ulp).all()
    assert (out != ref).float().mean().item() < 1e-3


@pytest.mark.parametrize("dtype", SMALL_DTYPES)
@pytest.mark.parametrize("hidden", [72, 200])
def test_rms_norm_matches_ref(hidden: int, dtype: torch.dtype) -> None:
    g = torch.Generator().manual_seed(hidden)
    x = (torch.randn(2, 7, hidden, generator=g) * 3).to(DEVICE, dtype)
    residual = torch.randn(2, 7, hidden, generator=g).to(DEVICE, dtype)
    weight = torch.randn(hidden, generator=g).to(DEVICE, dtype)
    _close_to_ulps(rms_norm(x, weight, 1e-5), rms_norm_ref(x, weight, 1e-5))
    normed, new_residual = fused_add_rms_norm(x, residual, weight, 1e-5)
    normed_ref, new_residual_ref = fused_add_rms_norm_ref(x, residual, weight, 1e-5)
    # The add is one float32 add rounded once: exact.
    assert torch.equal(new_residual, new_residual_ref)
    _close_to_ulps(normed, normed_ref)


def test_rms_norm_float32_weight_and_strided_rows() -> None:
    """A float32 weight with fp16 activations (torch promotes the product to float32), rows with padding."""
    g = torch.Generator().manual_seed(1)
    x = (torch.randn(5, 96, generator=g) * 2).to(DEVICE, torch.float16)[:, :72]
    weight = torch.randn(72, generator=g).to(DEVICE)
    _close_to_ulps(rms_norm(x, weight, 1e-6), rms_norm_ref(x, weight, 1e-6))


def test_fused_add_rms_norm_of_partial_sums() -> None:
    """fused_add_rms_norm_parts: x given as float32 partial sums (a split-K projection's), summed in order and
    rounded in the kernel: bit for bit the fused add + norm of that rounded sum; wrong shapes refused."""
    from kernels.triton_norm import fused_add_rms_norm_parts

    g = torch.Generator().manual_seed(2)
    parts = torch.randn(3, 5, 200, generator=g).to(DEVICE)
    residual = torch.randn(5, 200, generator=g).to(DEVICE, torch.float16)
    weight = (1 + 0.1 * torch.randn(200, generator=g)).to(DEVICE, torch.float16)
    normed, new_residual = fused_add_rms_norm_parts(parts, residual, weight, 1e-5)
    x = (parts[0] + parts[1] + parts[2]).to(torch.float16)
    want_normed, want_residual = fused_add_rms_norm(x, residual, weight, 1e-5)
    assert torch.equal(new_residual, want_residual) and torch.equal(normed, want_normed)
    with pytest.raises(ValueError):
        fused_add_rms_norm_parts(parts[:, :4], residual, weight, 1e-5)
    with pytest.raises(ValueError):
        fused_add_rms_norm_parts(parts.double(), residual, weight, 1e-5)


@pytest.mark.parametrize("dtype", SMALL_DTYPES)
@pytest.mark.parametrize("d", [72, 200, 1100])
def test_silu_and_mul_matches_ref(d: int, dtype: torch.dtype) -> None:
    x = (torch.randn(3, 5, 2 * d, generator=torch.Generator().manual_seed(d)) * 4).to(DEVICE, dtype)
    out = silu_and_mul(x)
    ref = silu_and_mul_ref(x)
    assert out.shape == (3, 5, d) and out.dtype == dtype
    # exp differs from torch's in the last float32 bit; a half-precision result then rounds alike nearly always.
    tol = {torch.float32: 1e-6, torch.float16: 1e-3, torch.bfloat16: 8e-3}[dtype]
    torch.testing.assert_close(out, ref, atol=tol, rtol=tol)
    with pytest.raises(ValueError):
        silu_and_mul(torch.randn(3, 7, device=DEVICE))


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
# rotary + store_kv, fused


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


def _assert_pools_equal(expected: KVPool, actual: KVPool) -> None:
    mismatch = (expected.buffer != actual.buffer).nonzero().flatten()
    assert mismatch.numel() == 0, f"{mismatch.numel()} pool bytes differ, the first at {mismatch[:5].tolist()}"


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
    _assert_pools_equal(expected, actual)


@pytest.mark.skipif(not INTERPRET, reason="the interpreter's own check; a GPU compares with the kernels above")
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_rotary_store_kv_matches_interpreted_kernels(dtype: torch.dtype) -> None:
    """Also the two Triton kernels in sequence, interpreted (not bf16: the interpreter's bf16 cast truncates)."""
    qkv, positions, slots, cache, expected, actual = _rotary_store_kv_inputs("int8", dtype, 9, 6, 2, 40, 40, 4)
    query, key, value = _split_qkv(qkv, 6, 2)
    q_ref, k_rotated = rotary(positions, query, key, cache)
    store_kv(k_rotated, value, expected.layer(1), slots)
    assert torch.equal(rotary_store_kv(positions, query, key, value, cache, actual.layer(1), slots), q_ref)
    _assert_pools_equal(expected, actual)


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
# real sizes on a GPU


def _rel_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    return ((out.float() - ref.float()).norm() / ref.float().norm()).item()


@pytest.mark.gpu
@pytest.mark.parametrize("spec_text", ["bf16", "int8", "fp8", "k=int8,v=bf16"])
def test_gpu_prefill_real_size(spec_text: str) -> None:
    """2 sequences x 2048 new tokens (one behind a cached prefix), 32 heads over 8 kv heads, head_dim 128, bf16."""
    case = _prefill_case(spec_text, [0, 509], [2048, 2048], num_kv_heads=8, group=4, head_dim=128, block_size=16,
                         query_dtype=torch.bfloat16, device="cuda")  # fmt: skip
    out, ref = _run_both(case, max_query_len=2048)
    assert out.dtype == torch.bfloat16
    assert torch.isfinite(out).all()
    assert _rel_error(out, ref) < 2e-2
    # The ref's own bf16 rounding of the output bounds how close two correct answers can be per element.
    torch.testing.assert_close(out.float(), ref.float(), atol=3e-2, rtol=3e-2)


@pytest.mark.gpu
@pytest.mark.parametrize("hidden", [4096, 5120])
def test_gpu_norm_real_size(hidden: int) -> None:
    x = torch.randn(4096, hidden, device="cuda").to(torch.bfloat16)
    residual = torch.randn(4096, hidden, device="cuda").to(torch.bfloat16)
    weight = (1 + 0.1 * torch.randn(hidden, device="cuda")).to(torch.bfloat16)
    _close_to_ulps(rms_norm(x, weight, 1e-5), rms_norm_ref(x, weight, 1e-5))
    normed, new_residual = fused_add_rms_norm(x, residual, weight, 1e-5)
    normed_ref, new_residual_ref = fused_add_rms_norm_ref(x, residual, weight, 1e-5)
    assert torch.equal(new_residual, new_residual_ref)
    _close_to_ulps(normed, normed_ref)


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


@pytest.mark.gpu
def test_gpu_silu_and_mul_real_size() -> None:
    x = torch.randn(4096, 2 * 14336, device="cuda").to(torch.bfloat16)
    torch.testing.assert_close(silu_and_mul(x).float(), silu_and_mul_ref(x).float(), atol=8e-3, rtol=8e-3)


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
    _assert_pools_equal(expected, actual)

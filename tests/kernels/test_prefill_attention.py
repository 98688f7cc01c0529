"""The Triton paged_prefill_attention (kernels/triton_prefill_attention.py) against paged_prefill_attention_ref.

Without a GPU it runs under TRITON_INTERPRET=1 (tests/conftest.py sets it) at small, odd sizes. The interpreter has
no usable bf16 (its bf16 tl.dot and int8->bf16 casts are wrong), so there fp32 stands in for bf16 and fp16 is the
half-precision case; bf16 runs on a GPU only. The `gpu` test repeats the checks at a real size.
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
from kernels.prefill_attention import paged_prefill_attention_ref  # noqa: E402
from kernels.store_kv import store_kv_ref  # noqa: E402
from kernels.triton_prefill_attention import paged_prefill_attention  # noqa: E402
from kvstore.block_table import blocks_needed, make_block_table_tensor, slot_mapping  # noqa: E402
from kvstore.formats import LayerKV, parse_kv_dtype  # noqa: E402
from kvstore.pool import KVPool, PoolGeometry  # noqa: E402
from tests.kernels.close import rel_error  # noqa: E402

# Interpreted kernels read CPU tensors; on a GPU machine the small tests run on the GPU too.
DEVICE = "cuda" if HAS_GPU and not INTERPRET else "cpu"
# "Full precision" KV and query: fp32 is the CPU stand-in for bf16 (the interpreter cannot do bf16).
HALF_DTYPES = [torch.float16] if INTERPRET else [torch.float16, torch.bfloat16]
needs_gpu_bf16 = pytest.mark.skipif(INTERPRET, reason="the Triton interpreter computes bf16 dots and casts wrongly")


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


def _small_tiles(head_dim: int, max_query_len: int, dtype: torch.dtype, quantized_v: bool,
                 target=None) -> tuple[int, int, int, int]:  # fmt: skip
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
# GPU, real size


@pytest.mark.gpu
@pytest.mark.parametrize("spec_text", ["bf16", "int8", "fp8", "k=int8,v=bf16"])
def test_gpu_prefill_real_size(spec_text: str) -> None:
    """2 sequences x 2048 new tokens (one behind a cached prefix), 32 heads over 8 kv heads, head_dim 128, bf16."""
    case = _prefill_case(spec_text, [0, 509], [2048, 2048], num_kv_heads=8, group=4, head_dim=128, block_size=16,
                         query_dtype=torch.bfloat16, device="cuda")  # fmt: skip
    out, ref = _run_both(case, max_query_len=2048)
    assert out.dtype == torch.bfloat16
    assert torch.isfinite(out).all()
    assert rel_error(out, ref) < 2e-2
    # The ref's own bf16 rounding of the output bounds how close two correct answers can be per element.
    torch.testing.assert_close(out.float(), ref.float(), atol=3e-2, rtol=3e-2)

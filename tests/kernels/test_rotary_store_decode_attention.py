"""The decode attention kernel with the new token's rotary and K/V store inside it (`new=NewToken(...)`), against the
references in sequence (rotary_store_kv_ref, then paged_decode_attention_ref).

The pool must hold the same bytes as the references leave (the store is store_kv's code), and the output must match:
the pool's slot of the new token holds garbage beforehand, so a kernel that read it before its own store was
visible, or stored it elsewhere, fails. Interpreter on the CPU at small odd sizes. On a GPU, real sizes and a CUDA
graph, the pool compared with the rotary_store_kv kernel's bytes (the torch rotary rounds differently from a compiled
one: no FMA) and the output with paged_decode_attention_ref over that pool.
"""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton", reason="triton is not installed: the Triton kernels cannot be tested")

from kernels.decode_attention import NewToken, paged_decode_attention_ref, rotary_store_decode_attention_ref  # noqa: E402
from kernels.rotary import compute_inv_freq, make_cos_sin_cache  # noqa: E402
from kernels.triton_decode_attention import paged_decode_attention  # noqa: E402
from kernels.triton_rotary_store_kv import rotary_store_kv  # noqa: E402
from kvstore.formats import parse_kv_dtype  # noqa: E402
from tests.kernels.close import assert_same_kv  # noqa: E402
from tests.kernels.inputs import DEVICE, stored_batch  # noqa: E402


def _step(spec_text, lens, num_kv_heads, group, head_dim, rot_dim, block_size, dtype, max_blocks=None, seed=0):
    """Two identical pools holding every sequence's first len - 1 tokens (and garbage at the new token's slot), and
    a decode step's inputs: the unrotated query, and the new token as `NewToken` (strided views of one qkv row, as
    the projection leaves them). A sequence of length 0 is batch padding (slot -1)."""
    spec = parse_kv_dtype(spec_text, torch.float32)
    layers = []
    for _ in range(2):
        layer, tables, context_lens = stored_batch(spec, [max(n - 1, 0) for n in lens], num_kv_heads, head_dim,
                                                   block_size, dtype, max_blocks=max_blocks, seed=seed,
                                                   spare=len(lens) + 3)  # fmt: skip
        layers.append(layer)
    # The tables cover len - 1 tokens; the new token may need one block more, from the spare ones (the same in both
    # pools).
    free = sorted(set(range(layers[0].k_cache.shape[0])) - set(tables.flatten().tolist()))
    widths = [-(-n // block_size) for n in lens]
    width = max(max(widths), tables.shape[1])
    grown = torch.zeros(len(lens), width, dtype=torch.int32)
    grown[:, : tables.shape[1]] = tables.cpu()
    for row, (n, w) in enumerate(zip(lens, widths, strict=True)):
        if n and (n - 1) % block_size == 0:  # the new token opens a block
            grown[row, w - 1] = free.pop()
    tables = grown.to(DEVICE)
    context_lens = torch.tensor(lens, dtype=torch.int32, device=DEVICE)
    positions = torch.tensor([max(n - 1, 0) for n in lens], device=DEVICE)
    slots = torch.tensor(
        [int(tables[i, (n - 1) // block_size]) * block_size + (n - 1) % block_size if n else -1 for i, n in
         enumerate(lens)], dtype=torch.int64, device=DEVICE)  # fmt: skip
    g = torch.Generator().manual_seed(seed + 7)
    heads = num_kv_heads * group
    # The new token's key larger than the cached ones: it takes a real share of the attention.
    gain = torch.cat([torch.ones(heads), torch.full((num_kv_heads,), 3.0), torch.ones(num_kv_heads)])
    qkv = (torch.randn(len(lens), heads + 2 * num_kv_heads, head_dim, generator=g) * gain[:, None]).to(DEVICE, dtype)
    cache = make_cos_sin_cache(compute_inv_freq(rot_dim, 500000.0, None), 4096, torch.float32).to(DEVICE)
    new = NewToken(positions, qkv[:, heads : heads + num_kv_heads], qkv[:, heads + num_kv_heads :], cache, slots)
    return layers, tables, context_lens, qkv[:, :heads], new


LENS = [1, 8, 9, 70, 200, 0]  # the new token alone, closing a block, opening one, several tiles, batch padding

CASES = [
    # (spec, num_kv_heads, group, head_dim, rot_dim, block_size, num_splits, query dtype)
    ("int8", 2, 3, 40, 40, 4, 3, torch.float32),
    ("int8", 2, 2, 64, 64, 16, 2, torch.float16),  # biased K, V pairs
    ("int8", 1, 4, 64, 32, 8, 1, torch.float16),  # partial rotary, one split (no reduce at all)
    ("fp8", 2, 3, 40, 40, 16, 4, torch.float32),
    ("bf16", 1, 2, 64, 64, 4, 3, torch.float32),
    ("k=int8,v=bf16", 2, 1, 40, 40, 16, 3, torch.float32),
]


@pytest.mark.parametrize(
    ("spec_text", "num_kv_heads", "group", "head_dim", "rot_dim", "block_size", "num_splits", "dtype"), CASES
)
def test_fused_decode_matches_refs(spec_text, num_kv_heads, group, head_dim, rot_dim, block_size, num_splits,
                                   dtype) -> None:  # fmt: skip
    layers, tables, lens, query, new = _step(spec_text, LENS, num_kv_heads, group, head_dim, rot_dim, block_size, dtype,
                                             max_blocks=256 // block_size)  # fmt: skip
    expected_layer, layer = layers
    scale = head_dim**-0.5
    expected = rotary_store_decode_attention_ref(query, expected_layer, tables, lens, scale, new)
    out = paged_decode_attention(query, layer, tables, lens, scale, num_splits=num_splits, new=new)
    assert_same_kv(expected_layer, layer)
    assert out.shape == query.shape and out[-1].eq(0).all()
    tol = {torch.float32: 2e-5, torch.float16: 4e-3}[dtype]
    torch.testing.assert_close(out, expected, atol=tol, rtol=tol)


def test_fused_decode_checks_arguments() -> None:
    (_, layer), tables, lens, query, new = _step("int8", [5, 9], 2, 2, 64, 64, 16, torch.float16)
    short = NewToken(new.positions[:1], new.key, new.value, new.cos_sin_cache, new.slot_mapping)
    with pytest.raises(ValueError, match="positions"):
        paged_decode_attention(query, layer, tables, lens, 0.1, new=short)
    with pytest.raises(ValueError, match="key and value"):
        paged_decode_attention(query, layer, tables, lens, 0.1,
                               new=NewToken(new.positions, new.key, new.value[:, :1], new.cos_sin_cache,
                                            new.slot_mapping))  # fmt: skip


# ---------------------------------------------------------------------------------------------------------------------
# GPU, real sizes: the 8B shape (32 query heads on 8 kv heads, head_dim 128), batch 32 and 1, contexts up to 4k.


def _gpu_lens(batch: int, seed: int) -> list[int]:
    g = torch.Generator().manual_seed(seed)
    lens = torch.randint(1, 4097, (batch,), generator=g).tolist()
    if batch > 3:
        lens[0], lens[1], lens[2] = 4096, 1, 0
    return lens


def _expected_on_gpu(layer, tables, lens, query, new, scale):
    """The pool as the rotary_store_kv kernel leaves it, and the reference attention over that pool."""
    q = rotary_store_kv(new.positions, query, new.key, new.value, new.cos_sin_cache, layer, new.slot_mapping)
    return paged_decode_attention_ref(q, layer, tables, lens, scale)


@pytest.mark.gpu
@pytest.mark.parametrize("spec_text", ["int8", "bf16", "fp8"])
@pytest.mark.parametrize("batch", [32, 1])
def test_fused_decode_gpu_real_sizes(spec_text: str, batch: int) -> None:
    (expected_layer, layer), tables, lens, query, new = _step(spec_text, _gpu_lens(batch, 0), 8, 4, 128, 128, 16,
                                                             torch.bfloat16)  # fmt: skip
    scale = 128**-0.5
    expected = _expected_on_gpu(expected_layer, tables, lens, query, new, scale)
    out = paged_decode_attention(query, layer, tables, lens, scale, max_context_len=4096, new=new)
    assert_same_kv(expected_layer, layer)
    torch.testing.assert_close(out.float(), expected.float(), atol=2e-2, rtol=2e-2)
    # and against the references in sequence, pool and all (the rotary's roundings may differ by an ulp)
    (ref_layer, _), *_ = _step(spec_text, _gpu_lens(batch, 0), 8, 4, 128, 128, 16, torch.bfloat16)
    ref = rotary_store_decode_attention_ref(query, ref_layer, tables, lens, scale, new)
    torch.testing.assert_close(out.float(), ref.float(), atol=2e-2, rtol=2e-2)


@pytest.mark.gpu
def test_fused_decode_gpu_same_as_two_kernels() -> None:
    """The fused step and the rotary_store_kv kernel + the attention kernel: same pool bytes, same output."""
    (first, second), tables, lens, query, new = _step("int8", _gpu_lens(32, 3), 8, 4, 128, 128, 16, torch.bfloat16)
    q = rotary_store_kv(new.positions, query, new.key, new.value, new.cos_sin_cache, first, new.slot_mapping)
    expected = paged_decode_attention(q, first, tables, lens, 0.088, max_context_len=4096)
    out = paged_decode_attention(query, second, tables, lens, 0.088, max_context_len=4096, new=new)
    assert_same_kv(first, second)
    torch.testing.assert_close(out.float(), expected.float(), atol=1e-3, rtol=1e-3)


@pytest.mark.gpu
def test_fused_decode_cuda_graph() -> None:
    """Captured once; replayed with new lengths, positions, slots and token values written in place."""
    lens0 = [4096] * 8
    (expected_layer, layer), tables, lens, query, new = _step("int8", lens0, 8, 4, 128, 128, 16, torch.bfloat16)
    scale = 128**-0.5

    def step() -> torch.Tensor:
        return paged_decode_attention(query, layer, tables, lens, scale, max_context_len=4096, new=new)

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        step()
    torch.cuda.current_stream().wait_stream(side)
    # what the warm-up stored, in the expected pool too
    _expected_on_gpu(expected_layer, tables, lens, query, new, scale)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = step()
    for seed in (1, 2):
        n = torch.randint(2, 4097, (8,), generator=torch.Generator().manual_seed(seed))
        lens.copy_(n.to(torch.int32))
        pos = (n - 1).to(DEVICE)
        new.positions.copy_(pos)
        new.slot_mapping.copy_(tables.long().gather(1, (pos // 16).view(-1, 1)).view(-1) * 16 + pos % 16)
        query.copy_(torch.randn_like(query))
        new.key.copy_(torch.randn_like(new.key) * 3)
        graph.replay()
        torch.cuda.synchronize()
        expected = _expected_on_gpu(expected_layer, tables, lens, query, new, scale)
        torch.testing.assert_close(out.float(), expected.float(), atol=2e-2, rtol=2e-2)
        assert_same_kv(expected_layer, layer)

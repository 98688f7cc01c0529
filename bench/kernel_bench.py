"""Kernel benchmarks (Llama-3-8B attention shape: 32 query heads, 8 KV heads, head_dim 128).

    python -m bench.kernel_bench

paged decode attention: bytes of K/V (+ scales) read over the measured copy bandwidth; store_kv: bytes written.
Kernels are timed inside a CUDA graph, as the decode worker runs them.
"""

from __future__ import annotations

import sys

import torch

from bench.common import copy_bandwidth, graph_time_ms, record, write_benchmarks_md
from bench.tune_decode_attention import BLOCK, HEAD_DIM, KV_HEADS, setup
from kernels import ops
from kernels.rotary import compute_inv_freq, make_cos_sin_cache
from kvstore.formats import parse_kv_dtype
from kvstore.pool import KVPool, PoolGeometry

COMMAND = "python -m bench.kernel_bench"


def decode_attention(bw: float, bs: int, ctx: int, kv: str) -> None:
    _, layer, tables, lens, q, nbytes = setup(bs, ctx, kv)
    ms = graph_time_ms(lambda: ops.paged_decode_attention(q, layer, tables, lens, HEAD_DIM**-0.5, ctx))
    floor_ms = nbytes / bw * 1e3
    name = f"attn_decode_bs{bs}_ctx{ctx // 1024}k" + ("" if kv == "int8" else f"_{kv}")
    record(name, nbytes / ms / 1e6, "GB/s", bw / 1e9, floor_ms / ms, COMMAND, time_ms=round(ms, 4), kv_dtype=kv)


def rotary_decode_attention(bw: float, bs: int, ctx: int) -> None:
    """The kernel as the decode step runs it (kernels/ops.py rotary_store_decode_attention): the new token's rotary
    and int8 store inside, then attention over the context that now holds it. Same floor as the attention alone
    plus the new token's bytes."""
    _, layer, tables, lens, q, nbytes = setup(bs, ctx, "int8")
    k_new, v_new = (torch.randn(bs, KV_HEADS, HEAD_DIM, dtype=torch.bfloat16, device="cuda") for _ in range(2))
    positions = lens.long() - 1
    slots = tables[:, -1].long() * BLOCK + (ctx - 1) % BLOCK
    cos_sin = make_cos_sin_cache(compute_inv_freq(HEAD_DIM, 500000.0, None).cuda(), ctx, torch.float32)
    ms = graph_time_ms(
        lambda: ops.rotary_store_decode_attention(
            positions, q, k_new, v_new, cos_sin, layer, slots, tables, lens, HEAD_DIM**-0.5, ctx
        )
    )
    nbytes += 2 * 2 * k_new.numel() * k_new.element_size()
    record(f"attn_rotary_store_decode_bs{bs}_ctx{ctx // 1024}k", nbytes / ms / 1e6, "GB/s", bw / 1e9,
           nbytes / bw * 1e3 / ms, COMMAND, time_ms=round(ms, 4), kv_dtype="int8")  # fmt: skip


def store_kv(bw: float, num_tokens: int, kv: str) -> None:
    spec = parse_kv_dtype(kv, torch.bfloat16)
    geometry = PoolGeometry(1, num_tokens // BLOCK, BLOCK, KV_HEADS, HEAD_DIM)
    pool = KVPool.allocate(geometry, spec, "cuda")
    layer = pool.layer(0)
    k = torch.randn(num_tokens, KV_HEADS, HEAD_DIM, dtype=torch.bfloat16, device="cuda")
    v = torch.randn_like(k)
    slots = torch.randperm(num_tokens, device="cuda")
    ms = graph_time_ms(lambda: ops.store_kv(k, v, layer, slots))
    written = num_tokens * 2 * KV_HEADS * (HEAD_DIM * layer.k_cache.element_size() + 4)
    nbytes = written + 2 * k.numel() * k.element_size()
    record(f"store_kv_{num_tokens}_{kv}", nbytes / ms / 1e6, "GB/s", bw / 1e9, nbytes / bw * 1e3 / ms, COMMAND)


def main() -> None:
    if not torch.cuda.is_available():
        sys.exit("kernel_bench needs a GPU")
    bw = copy_bandwidth()
    print(f"{torch.cuda.get_device_name()}: copy bandwidth {bw / 1e12:.2f} TB/s")
    for bs, ctx in ((32, 4096), (1, 8192), (8, 8192), (64, 1024), (128, 1024)):
        decode_attention(bw, bs, ctx, "int8")
    decode_attention(bw, 32, 4096, "bf16")
    for bs in (1, 64):
        rotary_decode_attention(bw, bs, 1024)
    store_kv(bw, 8192, "int8")
    write_benchmarks_md()


if __name__ == "__main__":
    main()

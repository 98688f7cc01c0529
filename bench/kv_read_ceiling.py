"""How fast can decode attention's K/V bytes be read with its access pattern alone, without its math?

    python -m bench.kv_read_ceiling

A Triton kernel that does only the reads of `_decode_split_kernel` (block ids, then K, V and their scales, tile by
tile through the block table; plain loads, which Triton does not pipeline in a loop without a dot: more splits put
more of them in flight) and sums them, at batch 32 x 4k. Two pool layouts: the pool's (token-major within a
block: [block, token, kv head, dim], each token-head row 128 bytes apart by 1 KB) and head-major within a block
([block, kv head, token, dim]: one 2 KB run per block and head). Each is reported as a fraction of the copy
bandwidth; the attention kernel's own fraction (kernel_bench.py) against these says whether its math or the layout
holds it back. Prints a table; writes bench/results/kv_read_ceiling.json; no records.

H200, 2026-12-04 (copy 4.21 TB/s): bf16 rows (256 bytes) read at 0.98-1.03 of copy bandwidth in both layouts, so
the token-major pool is no obstacle at that width. The int8 runs took as long as the bf16 ones (0.48-0.58): this
kernel's int8 -> float conversions bind it, so it gives no int8 ceiling; the attention kernel itself reads int8 at 0.79.
"""

from __future__ import annotations

import json
import sys

import torch
import triton
import triton.language as tl

from bench.common import RESULTS, copy_bandwidth, gpu_name, graph_time_ms

KV_HEADS, HEAD_DIM, BLOCK = 8, 128, 16


@triton.jit
def _read_kernel(k_ptr, v_ptr, ks_ptr, vs_ptr, bt_ptr, out_ptr, ctx, num_splits, stride_b, stride_s, stride_h,
                 stride_sb, stride_ss, stride_sh, stride_bt, BLOCK_SIZE: tl.constexpr, BLOCK_N: tl.constexpr,
                 HEAD_DIM: tl.constexpr):  # fmt: skip
    seq, head, split = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM)
    share = ctx // num_splits
    acc = tl.zeros([BLOCK_N, HEAD_DIM], dtype=tl.float32)
    scale_acc = tl.zeros([BLOCK_N], dtype=tl.float32)
    for t in range(split * share, split * share + share, BLOCK_N):
        blocks = tl.load(bt_ptr + seq * stride_bt + t // BLOCK_SIZE + offs_n // BLOCK_SIZE).to(tl.int64)
        rows = blocks * stride_b + head * stride_h + (offs_n % BLOCK_SIZE) * stride_s
        srows = blocks * stride_sb + head * stride_sh + (offs_n % BLOCK_SIZE) * stride_ss
        scale_acc += tl.load(ks_ptr + srows) + tl.load(vs_ptr + srows)
        k = tl.load(k_ptr + rows[:, None] + offs_d[None, :])
        v = tl.load(v_ptr + rows[:, None] + offs_d[None, :])
        acc += k.to(tl.float32) + v.to(tl.float32)
    total = tl.sum(tl.sum(acc, axis=1) + scale_acc, axis=0)
    tl.store(out_ptr + (seq * tl.num_programs(1) + head) * num_splits + split, total)


def measure(bw: float, bs: int, ctx: int, dtype: torch.dtype, layout: str, stages: int, warps: int, splits: int):
    blocks_per_seq = ctx // BLOCK
    num_blocks = bs * blocks_per_seq
    shape = (num_blocks, BLOCK * KV_HEADS * HEAD_DIM)
    k = torch.randint(-127, 127, shape, dtype=torch.int8, device="cuda").to(dtype)
    v = torch.randint(-127, 127, shape, dtype=torch.int8, device="cuda").to(dtype)
    ks, vs = (torch.rand(num_blocks, BLOCK * KV_HEADS, device="cuda") for _ in range(2))
    tables = torch.randperm(num_blocks, device="cuda", dtype=torch.int32).view(bs, blocks_per_seq)
    out = torch.empty(bs * KV_HEADS * splits, device="cuda")
    if layout == "token_major":
        strides = (KV_HEADS * HEAD_DIM, HEAD_DIM, KV_HEADS, 1)  # token, head; scale token, head
    else:
        strides = (HEAD_DIM, BLOCK * HEAD_DIM, 1, BLOCK)
    fn = lambda: _read_kernel[(bs, KV_HEADS, splits)](  # noqa: E731
        k, v, ks, vs, tables, out, ctx, splits, shape[1], strides[0], strides[1], BLOCK * KV_HEADS, strides[2],
        strides[3], tables.stride(0), BLOCK_SIZE=BLOCK, BLOCK_N=128, HEAD_DIM=HEAD_DIM, num_warps=warps,
        num_stages=stages,
    )  # fmt: skip
    ms = graph_time_ms(fn)
    nbytes = 2 * (k.numel() * k.element_size() + ks.numel() * 4)
    return {"bs": bs, "ctx": ctx, "dtype": str(dtype), "layout": layout, "stages": stages, "warps": warps,
            "splits": splits, "us": round(ms * 1e3, 2), "fraction": round(nbytes / bw / (ms / 1e3), 4)}  # fmt: skip


def main() -> None:
    if not torch.cuda.is_available():
        sys.exit("kv_read_ceiling needs a GPU")
    bw = copy_bandwidth()
    print(f"{gpu_name()}: copy bandwidth {bw / 1e12:.2f} TB/s")
    rows = []
    for dtype in (torch.int8, torch.bfloat16):
        for layout in ("token_major", "head_major"):
            for stages, warps, splits in ((3, 4, 1), (3, 8, 1), (3, 4, 2), (3, 4, 4), (3, 4, 8)):
                row = measure(bw, 32, 4096, dtype, layout, stages, warps, splits)
                print(row)
                rows.append(row)
                torch.cuda.empty_cache()
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "kv_read_ceiling.json").write_text(json.dumps({"gpu": gpu_name(), "copy_bandwidth": bw, "rows": rows}))


if __name__ == "__main__":
    main()

"""Sweep the int8 paged decode attention kernel's launch choices and int8 conversions on the GPU.

    python -m bench.tune_decode_attention [--shapes 32x4096,64x1024] [--grid '{"pairs": [true, false], ...}']

Each variant is checked against the torch reference before it is timed (a fast wrong kernel is not a result), timed
inside a CUDA graph as the decode worker runs it, and reported as a fraction of the measured copy bandwidth. (Scales
laid out [block, head, token] were tried on an H200 and made no difference.) Writes
bench/results/tune_decode_attention.json; records nothing in summary.json (kernel_bench.py measures the defaults).
"""

from __future__ import annotations

import argparse
import itertools
import json

import torch

from bench.common import RESULTS, copy_bandwidth, gpu_name, graph_time_ms
from bench.model_bench import fill_random
from kernels.decode_attention import paged_decode_attention_ref
from kernels.triton_decode_attention import paged_decode_attention
from kvstore.formats import parse_kv_dtype
from kvstore.pool import KVPool, PoolGeometry

HEADS, KV_HEADS, HEAD_DIM, BLOCK = 32, 8, 128, 16


def setup(bs: int, ctx: int, kv: str):
    spec = parse_kv_dtype(kv, torch.bfloat16)
    blocks_per_seq = ctx // BLOCK
    pool = KVPool.allocate(PoolGeometry(1, bs * blocks_per_seq, BLOCK, KV_HEADS, HEAD_DIM), spec, "cuda")
    fill_random(pool)
    layer = pool.layer(0)
    tables = torch.randperm(bs * blocks_per_seq, device="cuda").view(bs, blocks_per_seq).int()
    lens = torch.full((bs,), ctx, dtype=torch.int32, device="cuda")
    q = torch.randn(bs, HEADS, HEAD_DIM, dtype=torch.bfloat16, device="cuda")
    per_token = 2 * KV_HEADS * (HEAD_DIM * layer.k_cache.element_size() + (4 if layer.k_scale is not None else 0))
    nbytes = bs * ctx * per_token + 2 * q.numel() * q.element_size()
    return pool, layer, tables, lens, q, nbytes


def run_variant(layer, tables, lens, q, ctx, tuning, ref) -> tuple[float, float]:
    fn = lambda: paged_decode_attention(q, layer, tables, lens, HEAD_DIM**-0.5, max_context_len=ctx, tuning=tuning)  # noqa: E731
    out = fn()
    err = ((out.float() - ref).abs().max() / ref.abs().max()).item()
    if not err < 2e-2:
        raise AssertionError(f"wrong result: rel err {err:.3g}")
    return graph_time_ms(fn), err


def tune_shape(bs: int, ctx: int, bw: float, grid: dict, no_splits: bool = False) -> list[dict]:
    pool, layer, tables, lens, q, nbytes = setup(bs, ctx, "int8")
    ref = paged_decode_attention_ref(q.float(), layer, tables, lens, HEAD_DIM**-0.5).float()
    floor_ms = nbytes / bw * 1e3
    rows = []

    def attempt(lay, layout_name, tuning):
        row = {"bs": bs, "ctx": ctx, "scales": layout_name, **tuning}
        try:
            ms, err = run_variant(lay, tables, lens, q, ctx, dict(tuning), ref)
            row |= {"ms": round(ms, 5), "fraction": round(floor_ms / ms, 4), "rel_err": err}
        except Exception as exc:  # a config that does not compile or is wrong is reported, not fatal
            row["error"] = f"{type(exc).__name__}: {str(exc)[:200]}"
        rows.append(row)
        print(row, flush=True)

    # Stage 1: tile x stages x register cap, scales as the pool lays them out, default split policy.
    g = grid
    for combo in itertools.product(*g.values()):
        attempt(layer, "token_major", dict(zip(g, combo, strict=True)))
    # Stage 2: the three best, with other split policies.
    top = [] if no_splits else sorted((r for r in rows if "ms" in r), key=lambda r: r["ms"])[:3]
    for r in top:
        tuning = {k: r[k] for k in grid}
        for pps in (2, 4, 8, 16):
            attempt(layer, "token_major", tuning | {"programs_per_sm": pps})
    # Stage 3: at batch 1 the split count (capped by MIN_TOKENS_PER_SPLIT) and the tile set the latency
    if bs == 1 and not no_splits:
        for splits, block_n in itertools.product((4, 8, 16, 32), (32, 64, 128)):
            if ctx // splits >= block_n:
                attempt(layer, "token_major", {"convert": 2, "block_n": block_n, "num_splits": splits})
    best = min((r for r in rows if "ms" in r), key=lambda r: r["ms"], default=None)
    default_ms, _ = run_variant(layer, tables, lens, q, ctx, None, ref)
    print(f"bs{bs} ctx{ctx}: default {default_ms * 1e3:.1f} us ({floor_ms / default_ms:.3f} of floor); best {best}")
    rows.append({"bs": bs, "ctx": ctx, "default": True, "ms": default_ms, "fraction": floor_ms / default_ms})
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--grid", default=None, help="JSON {tuning key: [values]} replacing the default grid")
    parser.add_argument("--no-splits", action="store_true", help="skip the split-policy stage")
    parser.add_argument("--shapes", default="32x4096,64x1024,1x1024,1x8192", help="batch x context, comma-separated")
    args = parser.parse_args()
    bw = copy_bandwidth()
    print(f"{gpu_name()}: copy bandwidth {bw / 1e12:.2f} TB/s")
    # Last run (H200): the PTX conversion and 4 warps won everywhere; 128 tokens beat 64. What is left: registers.
    # ptxas gives the int8 kernel 186-255 registers (2 programs an SM, 64 KB of K/V in flight); capped at 128 it
    # does not spill and 4 programs fit.
    # Second run: 128 registers, 128 tokens, 2 stages, 2 programs an SM: 0.70 / 0.68. Now: warps and tiles around it.
    # Third run: the same plateau (0.68-0.70) for every warps/tile/stage choice around that. Fourth: the int8 -> fp16
    # conversion pinned before shared memory (an impure asm block Triton cannot move), which cuts the loop from 1380
    # to 913 instructions a tile (sm_90 SASS: no more byte-wise LDS of V) but needs 75 KB of shared memory a program:
    # 0.54 at best. Not kept.
    # Fifth (2026-12-03): int8 K biased by 1152 and V read as int16 pairs of dims (`pairs`, `biased`), 1380 -> 960
    # instructions a tile: no faster (0.69-0.70), nor the grid with the KV heads first. ncu: latency-bound (62% of
    # DRAM bandwidth, long-scoreboard stalls). Then the scales loaded beside the block ids, at the head of the tile:
    # 0.805 / 0.767 with 3 stages (0.764 / 0.734 with 2).
    # Sixth (2026-12-04, H200, copy 4.24 TB/s): 5 and 7 stages, the first counts at which Triton 3.6 gives the loop two
    # and three K/V buffers (3 and 4 stages give one): slower at 32 x 4k (0.64 / 0.61 against 0.79 with 3), 64 x 1k
    # (0.59 / 0.56 against 0.74) and batch 1; 8 warps 0.49 at best, 64-token tiles 0.60, more programs an SM than 2
    # (2 splits at 32 x 4k) 0.64. The defaults stay. Also measured then, outside this script: one program per pair of
    # KV heads (the pool viewed as 4 heads of 256 dims: 256-byte rows, half the softmax work per byte) 0.57 at best.
    # Seventh (2026-12-04): stages 3 / 5 x register cap 128 / 168 / none, defaults elsewhere. 32 x 4k: 5 stages and no
    # cap 0.817 (best; 0.795 capped at 3). 64 x 1k: the cap at 3 stages stays best (0.759; 0.742 at 5 uncapped).
    # Batch 1 x 1k: no cap 0.098 against 0.090. Hence FEW_PROGRAMS_UNCAPPED (kernels/triton_decode_attention.py).
    grid = {
        "pairs": (True, False),
        "convert": (2,),
        "block_n": (64, 128),
        "num_warps": (2, 4, 8),
        "num_stages": (2, 3, 4),
        "maxnreg": (0, 128),
    }
    if args.grid:
        grid = {k: tuple(v) for k, v in json.loads(args.grid).items()}
    results = []
    for bs, ctx in (tuple(int(v) for v in shape.split("x")) for shape in args.shapes.split(",")):
        results += tune_shape(bs, ctx, bw, grid, args.no_splits)
        torch.cuda.empty_cache()
    errors = [r for r in results if "error" in r]
    print(f"{len(errors)} variants failed; first: {errors[:3]}")
    RESULTS.mkdir(parents=True, exist_ok=True)
    out = {"gpu": gpu_name(), "copy_bandwidth": bw, "results": results}
    (RESULTS / "tune_decode_attention.json").write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()

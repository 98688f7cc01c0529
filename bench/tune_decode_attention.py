"""Sweep the paged decode attention kernel's launch choices on the GPU, and A/B the pool's V layout.

    python bench/tune_decode_attention.py [--quick] [--kv-dtypes int8,bf16] [--shapes 32x4096,64x1024] [--prefill]

Each variant is checked against the torch reference before it is timed (a fast wrong kernel is not a result), timed
inside a CUDA graph as the decode worker runs it, and reported as a fraction of the measured copy bandwidth. The
default launch is also timed with V laid out [block, token, head, channel] (row-major, the pool's layout before V
went token-major; same kernel source, same data) against the pool's token-major V, in the same run; --prefill does the
same A/B for paged prefill attention (as a fraction of the bf16 matmul rate). (Scales laid out [block, head, token]
were tried on an H200 and made no difference.) Writes bench/results/tune_decode_attention.json; records nothing in
summary.json (kernel_bench.py measures the defaults).
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import RESULTS, copy_bandwidth, gpu_name, graph_time_ms, matmul_rate  # noqa: E402
from bench.model_bench import fill_random  # noqa: E402
from kernels.decode_attention import paged_decode_attention_ref  # noqa: E402
from kernels.prefill_attention import paged_prefill_attention_ref  # noqa: E402
from kernels.triton_decode_attention import paged_decode_attention  # noqa: E402
from kernels.triton_prefill_attention import paged_prefill_attention  # noqa: E402
from kvstore.formats import parse_kv_dtype  # noqa: E402
from kvstore.pool import KVPool, LayerKV, PoolGeometry  # noqa: E402

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


def row_major_v(layer: LayerKV) -> LayerKV:
    """The same layer with a row-major copy of V, [num_blocks, block_size, num_kv_heads, head_dim] contiguous: the
    kernels read V through its strides, so this times the other layout with the same source and the same values."""
    return dataclasses.replace(layer, v_cache=layer.v_cache.contiguous())


def run_variant(layer, tables, lens, q, ctx, tuning, ref) -> tuple[float, float]:
    fn = lambda: paged_decode_attention(q, layer, tables, lens, HEAD_DIM**-0.5, max_context_len=ctx, tuning=tuning)  # noqa: E731
    out = fn()
    err = ((out.float() - ref).abs().max() / ref.abs().max()).item()
    if not err < 2e-2:
        raise AssertionError(f"wrong result: rel err {err:.3g}")
    return graph_time_ms(fn), err


def tune_shape(bs: int, ctx: int, bw: float, grid: dict, kv: str) -> list[dict]:
    pool, layer, tables, lens, q, nbytes = setup(bs, ctx, kv)
    ref = paged_decode_attention_ref(q.float(), layer, tables, lens, HEAD_DIM**-0.5).float()
    floor_ms = nbytes / bw * 1e3
    rows = []

    def attempt(lay, layout_name, tuning):
        row = {"kv": kv, "bs": bs, "ctx": ctx, "v_layout": layout_name, **tuning}
        try:
            ms, err = run_variant(lay, tables, lens, q, ctx, dict(tuning), ref)
            row |= {"ms": round(ms, 5), "fraction": round(floor_ms / ms, 4), "rel_err": err}
        except Exception as exc:  # a config that does not compile or is wrong is reported, not fatal
            row["error"] = f"{type(exc).__name__}: {str(exc)[:200]}"
        rows.append(row)

    # Stage 1: tile x stages x register cap, scales as the pool lays them out, default split policy.
    g = grid
    for combo in itertools.product(*g.values()):
        attempt(layer, "token_major", dict(zip(g, combo, strict=True)))
    # Stage 2: the three best, with other split policies.
    top = sorted((r for r in rows if "ms" in r), key=lambda r: r["ms"])[:3]
    for r in top:
        tuning = {k: r[k] for k in grid}
        for pps in (2, 4, 8, 16):
            attempt(layer, "token_major", tuning | {"programs_per_sm": pps})
    if bs == 1:  # Stage 3: at batch 1 the split count (capped by MIN_TOKENS_PER_SPLIT) and the tile set the latency
        for splits, block_n in itertools.product((4, 8, 16, 32), (32, 64, 128)):
            if ctx // splits >= block_n:
                attempt(layer, "token_major", {"convert": 2, "block_n": block_n, "num_splits": splits})
    best = min((r for r in rows if "ms" in r), key=lambda r: r["ms"], default=None)
    for layout_name, lay in (("token_major", layer), ("row_major", row_major_v(layer))):
        default_ms, _ = run_variant(lay, tables, lens, q, ctx, None, ref)
        print(f"{kv} bs{bs} ctx{ctx} V {layout_name}: default {default_ms * 1e3:.1f} us "
              f"({floor_ms / default_ms:.3f} of floor)")  # fmt: skip
        rows.append({"kv": kv, "bs": bs, "ctx": ctx, "v_layout": layout_name, "default": True, "ms": default_ms,
                     "fraction": floor_ms / default_ms})  # fmt: skip
    print(f"{kv} bs{bs} ctx{ctx}: best {best}")
    return rows


def prefill_layout_ab(rate: float, num_seqs: int, q_len: int, kv: str) -> list[dict]:
    """Paged prefill attention over a fresh prompt (no cached prefix), token-major V against row-major V."""
    spec = parse_kv_dtype(kv, torch.bfloat16)
    blocks_per_seq = q_len // BLOCK
    pool = KVPool.allocate(PoolGeometry(1, num_seqs * blocks_per_seq, BLOCK, KV_HEADS, HEAD_DIM), spec, "cuda")
    fill_random(pool)
    layer = pool.layer(0)
    tables = torch.randperm(num_seqs * blocks_per_seq, device="cuda").view(num_seqs, blocks_per_seq).int()
    lens = torch.full((num_seqs,), q_len, dtype=torch.int32, device="cuda")
    cu = torch.arange(0, (num_seqs + 1) * q_len, q_len, dtype=torch.int32, device="cuda")
    q = torch.randn(num_seqs * q_len, HEADS, HEAD_DIM, dtype=torch.bfloat16, device="cuda")
    scale = HEAD_DIM**-0.5
    ref = paged_prefill_attention_ref(q.float(), layer, tables, cu, lens, scale).float()
    # Causal: half of the q_len x q_len score matrix, two matmuls of 2 * head_dim FLOPs per score and head.
    floor_ms = num_seqs * HEADS * q_len * q_len / 2 * 4 * HEAD_DIM / rate * 1e3
    rows = []
    for layout_name, lay in (("token_major", layer), ("row_major", row_major_v(layer))):
        fn = lambda lay=lay: paged_prefill_attention(q, lay, tables, cu, lens, scale, max_query_len=q_len)  # noqa: E731
        err = ((fn().float() - ref).abs().max() / ref.abs().max()).item()
        if not err < 2e-2:
            raise AssertionError(f"prefill {kv} V {layout_name}: wrong result, rel err {err:.3g}")
        ms = graph_time_ms(fn)
        print(f"prefill {kv} {num_seqs}x{q_len} V {layout_name}: {ms * 1e3:.1f} us ({floor_ms / ms:.3f} of floor)")
        rows.append({"prefill": True, "kv": kv, "seqs": num_seqs, "q_len": q_len, "v_layout": layout_name,
                     "ms": round(ms, 5), "fraction": round(floor_ms / ms, 4), "rel_err": err})  # fmt: skip
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer variants")
    parser.add_argument("--shapes", default="32x4096,64x1024,1x1024,1x8192", help="batch x context, comma-separated")
    parser.add_argument("--kv-dtypes", default="int8", help="KV formats to tune, comma-separated (int8, fp8, bf16)")
    parser.add_argument("--prefill", action="store_true", help="also A/B the V layout in prefill attention")
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
    # Fifth: V stored token-major in the pool (kvstore/pool.py), so that P @ V's int8 operand reaches the tensor cores
    # as K's does; sm_90 SASS of the int8 loop: 1380 -> 946 instructions a tile, no byte-wise LDS left.
    grid = {
        "convert": (2,),
        "block_n": (64, 128),
        "num_warps": (2, 4, 8),
        "num_stages": (2, 3, 4),
        "maxnreg": (0, 128),
    }
    # 16-bit KV: no conversion; ptxas stays under 168 registers (3 programs an SM) by itself.
    grid_16bit = {"block_n": (64, 128), "num_warps": (4, 8), "num_stages": (2, 3, 4)}
    if args.quick:
        grid = {"convert": (2,), "block_n": (128,), "num_warps": (4,), "num_stages": (2, 3), "maxnreg": (128,)}
        grid_16bit = {"block_n": (128,), "num_warps": (4,), "num_stages": (2, 3)}
    rate = matmul_rate() if args.prefill else 0.0
    results = []
    for kv in args.kv_dtypes.split(","):
        for bs, ctx in (tuple(int(v) for v in shape.split("x")) for shape in args.shapes.split(",")):
            results += tune_shape(bs, ctx, bw, grid if kv in ("int8", "fp8") else grid_16bit, kv)
            torch.cuda.empty_cache()
        if args.prefill:
            results += prefill_layout_ab(rate, 4, 2048, kv)
            torch.cuda.empty_cache()
    errors = [r for r in results if "error" in r]
    print(f"{len(errors)} variants failed; first: {errors[:3]}")
    RESULTS.mkdir(parents=True, exist_ok=True)
    out = {"gpu": gpu_name(), "copy_bandwidth": bw, "results": results}
    (RESULTS / "tune_decode_attention.json").write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()

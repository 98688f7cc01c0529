"""Where a decode step's GPU time goes: per-kernel device time of one eager step (the same kernels a graph replays).

    python bench/profile_decode.py --model DIR [--batch 1] [--ctx 1024]

Writes bench/results/profile_decode_bs{B}_ctx{C}.txt: kernels grouped by name, total device microseconds per step,
and the GEMM share against the bytes-over-bandwidth floor.
"""

from __future__ import annotations

import argparse
import sys
from collections import defaultdict
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import RESULTS, copy_bandwidth  # noqa: E402
from bench.model_bench import fill_random, weight_bytes  # noqa: E402
from kvstore.formats import parse_kv_dtype  # noqa: E402
from kvstore.pool import KVPool, PoolGeometry  # noqa: E402
from services.model.loader import load_model  # noqa: E402
from services.model.runner import ModelRunner, SeqChunk  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--ctx", type=int, default=1024)
    parser.add_argument("--steps", type=int, default=10)
    args = parser.parse_args()
    bw = copy_bandwidth()
    model = load_model(args.model, torch.bfloat16, "cuda", progress=False)
    c = model.config
    bs, ctx, block = args.batch, args.ctx, 16
    per_seq = -(-(ctx + 1) // block)
    geometry = PoolGeometry(c.num_layers, bs * per_seq, block, c.num_kv_heads, c.head_dim)
    pool = KVPool.allocate(geometry, parse_kv_dtype("int8", torch.bfloat16), "cuda")
    fill_random(pool)
    runner = ModelRunner(model, pool)
    chunks = [SeqChunk((7,), ctx, tuple(range(i * per_seq, (i + 1) * per_seq))) for i in range(bs)]
    for _ in range(3):
        runner.forward(chunks)
    torch.cuda.synchronize()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        for _ in range(args.steps):
            runner.forward(chunks)
        torch.cuda.synchronize()
    totals: dict[str, float] = defaultdict(float)
    counts: dict[str, int] = defaultdict(int)
    for e in prof.events():
        if e.device_type == torch.autograd.DeviceType.CUDA:
            totals[e.name] += e.device_time / args.steps
            counts[e.name] += 1
    step_us = sum(totals.values())
    floor_us = weight_bytes(model) / bw * 1e6
    lines = [
        f"{torch.cuda.get_device_name()}: batch {bs}, context {ctx}, int8 KV; device time per step {step_us:.0f} us "
        f"(kernels only, no launch gaps); weights floor {floor_us:.0f} us",
        f"{'us/step':>9} {'share':>6} {'calls':>6}  kernel",
    ]
    for name, us in sorted(totals.items(), key=lambda kv: -kv[1])[:30]:
        lines.append(f"{us:9.1f} {us / step_us:6.1%} {counts[name] // args.steps:6d}  {name[:110]}")
    text = "\n".join(lines)
    print(text)
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"profile_decode_bs{bs}_ctx{ctx}.txt").write_text(text + "\n")


if __name__ == "__main__":
    main()

"""Where a decode step's GPU time goes: per-kernel device time of one eager step (the same kernels a graph replays).

    python -m bench.profile_decode --model DIR [--batch 1] [--ctx 1024] [--graph]

Writes bench/results/profile_decode_bs{B}_ctx{C}.txt: kernels grouped by name, total device microseconds per step,
and the GEMM share against the bytes-over-bandwidth floor. A kernel launched the same number of times in every layer
is also broken down by its place in the layer (the four projections of a Llama layer: qkv, o, gate_up, down), each
projection against its own weight's floor. With PDL a kernel's time includes its wait for the kernel before it.
--graph profiles CUDA-graph replays (as the decode worker runs steps) instead of eager steps.
"""

from __future__ import annotations

import argparse
from collections import defaultdict

import torch

from bench.common import RESULTS, copy_bandwidth
from bench.model_bench import fill_random, weight_bytes
from kernels import pdl
from kvstore.formats import parse_kv_dtype
from kvstore.pool import KVPool, PoolGeometry
from services.model.loader import load_model
from services.model.runner import ModelRunner, SeqChunk


def by_position(durations: list[float], steps: int, num_layers: int) -> list[tuple[str, float, int]]:
    """One kernel's durations (us) in launch order over `steps` steps -> (place, us per step, calls per step) for
    each place in a layer ("layer slot j": the j-th launch of it in every layer), plus "after the layers" for the
    launches past a whole number per layer (a Llama step's lm_head GEMV). [] if it is not launched in every layer
    or the count does not split into equal steps."""
    if steps <= 0 or len(durations) % steps:
        return []
    per_step = len(durations) // steps
    per_layer = per_step // num_layers
    if per_layer < 1:
        return []
    sums: dict[str, float] = defaultdict(float)
    calls: dict[str, int] = defaultdict(int)
    for i, us in enumerate(durations):
        pos = i % per_step
        place = f"layer slot {pos % per_layer}" if pos < per_layer * num_layers else "after the layers"
        sums[place] += us / steps
        calls[place] += 1
    return [(place, sums[place], calls[place] // steps) for place in sums]


def projection_bytes(model) -> list[int]:
    """Weight bytes of a Llama layer's projections in launch order (qkv, o, gate_up, down), or [] for other
    layers."""
    layer = model.model.layers[0]
    try:
        weights = [layer.self_attn.qkv_proj.weight, layer.self_attn.o_proj.weight, layer.mlp.gate_up_proj.weight,
                   layer.mlp.down_proj.weight]  # fmt: skip
    except AttributeError:
        return []
    return [w.numel() * w.element_size() for w in weights]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--ctx", type=int, default=1024)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--graph", action="store_true", help="profile CUDA-graph replays instead of eager steps")
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
    if args.graph:
        runner.enable_cuda_graphs(bs, ctx + 1)
    for _ in range(3):
        runner.forward(chunks)
    torch.cuda.synchronize()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        for _ in range(args.steps):
            runner.forward(chunks)
        torch.cuda.synchronize()
    totals: dict[str, float] = defaultdict(float)
    counts: dict[str, int] = defaultdict(int)
    ordered: dict[str, list[tuple[float, float]]] = defaultdict(list)  # name -> (start, duration)
    for e in prof.events():
        if e.device_type == torch.autograd.DeviceType.CUDA:
            totals[e.name] += e.device_time / args.steps
            counts[e.name] += 1
            ordered[e.name].append((e.time_range.start, e.device_time))
    step_us = sum(totals.values())
    pdl_state = "on" if pdl.launch_options(torch.device("cuda"))["PDL"] else "off (KVRELAY_PDL=0)"
    floor_us = weight_bytes(model) / bw * 1e6
    lines = [
        f"{torch.cuda.get_device_name()}: batch {bs}, context {ctx}, int8 KV; device time per step {step_us:.0f} us "
        f"(kernels only, no launch gaps); weights floor {floor_us:.0f} us; PDL {pdl_state}"
        f"{', graph replays' if args.graph else ''}",
        f"{'us/step':>9} {'share':>6} {'calls':>6}  kernel",
    ]
    for name, us in sorted(totals.items(), key=lambda kv: -kv[1])[:30]:
        lines.append(f"{us:9.1f} {us / step_us:6.1%} {counts[name] // args.steps:6d}  {name[:110]}")
    proj = projection_bytes(model)
    for name in sorted(totals, key=totals.get, reverse=True)[:6]:
        places = by_position([d for _, d in sorted(ordered[name])], args.steps, c.num_layers)
        slots = [p for p, _, _ in places if p.startswith("layer slot")]
        if len(places) < 2:
            continue
        lines.append(f"{name[:60]} by its place in a layer:")
        for place, place_us, calls in places:
            each = place_us / calls
            floor = ""
            if place in slots and len(slots) == len(proj):  # the four projections, in launch order
                floor_each = proj[slots.index(place)] / bw * 1e6
                floor = f", floor {floor_each:6.1f} us ({floor_each / each:.3f})"
            lines.append(f"  {place:17} {place_us:8.1f} us/step, {calls:3d} calls, {each:6.1f} us each{floor}")
    text = "\n".join(lines)
    print(text)
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"profile_decode_bs{bs}_ctx{ctx}.txt").write_text(text + "\n")


if __name__ == "__main__":
    main()

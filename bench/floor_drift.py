"""Do the decode floor and the decode step drift together? On one GPU, in one process, round after round: the copy
bandwidth (the floor's rate), a read-only bandwidth, the batch-1 x 1k decode step, and the GPU's temperatures, with a
stretch of back-to-back copies between rounds to heat the memory.

    python bench/floor_drift.py --model DIR [--rounds 6] [--heat-s 15]

Why: record runs of one commit on different H200s read the copy bandwidth at 4.11-4.26 TB/s and the batch-1 step at
3.95-4.01 ms, so the decode fractions moved by 4%. If the floor's rate and the step move together on one machine, the
fraction is a stable measure and the spread is between machines; if the copy reading drifts alone, the floor is the
noise. Prints a table; writes bench/results/floor_drift.json; no records.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import RESULTS, copy_bandwidth_samples, gpu_name, time_ms  # noqa: E402
from bench.model_bench import CHAIN, fill_random, weight_bytes  # noqa: E402
from kvstore.formats import bytes_per_token, parse_kv_dtype  # noqa: E402
from kvstore.pool import KVPool, PoolGeometry  # noqa: E402
from services.model.loader import load_model  # noqa: E402
from services.model.runner import ModelRunner, SeqChunk  # noqa: E402

SMI_FIELDS = "temperature.gpu,temperature.memory,clocks.sm,clocks.mem,power.draw,clocks_throttle_reasons.active"


def read_bandwidth() -> float:
    """Bytes/s of summing a 4 GiB bf16 buffer: reads only."""
    t = torch.randn(2**31, dtype=torch.bfloat16, device="cuda")
    ms = time_ms(lambda: t.sum(dtype=torch.float32), warmup=2, iters=10)
    t = None
    torch.cuda.empty_cache()
    return 2**32 / (ms / 1e3)


def smi() -> str:
    index = str(torch.cuda.current_device())
    out = subprocess.run(["nvidia-smi", "-i", index, f"--query-gpu={SMI_FIELDS}", "--format=csv,noheader"],
                         capture_output=True, text=True)  # fmt: skip
    return out.stdout.strip()


def batch1_step(model, ctx: int = 1024, block: int = 16):
    """A function timing one batch-1 decode step as model_bench does (graph replays queued back to back), in ms."""
    c = model.config
    spec = parse_kv_dtype("int8", torch.bfloat16)
    per_seq = -(-(ctx + 1) // block)
    pool = KVPool.allocate(PoolGeometry(c.num_layers, per_seq, block, c.num_kv_heads, c.head_dim), spec, "cuda")
    fill_random(pool)
    runner = ModelRunner(model, pool)
    runner.enable_cuda_graphs(1, ctx + 1)
    chunk = SeqChunk((7,), ctx, tuple(range(per_seq)))
    runner.forward([chunk])
    slot = chunk.block_table[ctx // block] * block + ctx % block
    ids, positions, slots = (torch.tensor(v).cuda() for v in ([7], [ctx], [slot]))
    tables = torch.tensor([list(chunk.block_table)], dtype=torch.int32, device="cuda")
    lens = torch.full((1,), ctx + 1, dtype=torch.int32, device="cuda")

    def chained():
        out = ids
        for _ in range(CHAIN):
            out = runner.graphs.replay(out, positions, slots, tables, lens).argmax(-1)

    floor_bytes = weight_bytes(model) + (ctx + 1) * bytes_per_token(spec, c.num_layers, c.num_kv_heads, c.head_dim)
    return (lambda: time_ms(chained, warmup=2, iters=10) / CHAIN), floor_bytes


def heat(seconds: float) -> None:
    src = torch.empty(2**31, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        for _ in range(20):
            dst.copy_(src)
        torch.cuda.synchronize()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True)
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--heat-s", type=float, default=15.0)
    args = parser.parse_args()
    if not torch.cuda.is_available():
        sys.exit("floor_drift needs a GPU")
    model = load_model(args.model, torch.bfloat16, "cuda", progress=False)
    step, floor_bytes = batch1_step(model)
    print(f"{gpu_name()}; nvidia-smi fields: {SMI_FIELDS}")
    print(f"{'round':>5} {'copy TB/s (3 pairs)':>24} {'read TB/s':>9} {'step ms':>8} {'fraction':>8}  nvidia-smi")
    rows = []
    for r in range(args.rounds):
        if r:
            heat(args.heat_s)
        state = smi()
        copies = copy_bandwidth_samples(3)
        read = read_bandwidth()
        ms = step()
        bw = statistics.median(copies)
        fraction = floor_bytes / bw * 1e3 / ms
        rows.append({"round": r, "copy_tbs": [round(c / 1e12, 4) for c in copies], "read_tbs": round(read / 1e12, 4),
                     "step_ms": round(ms, 4), "fraction": round(fraction, 4), "smi": state})  # fmt: skip
        spread = "-".join(f"{c / 1e12:.3f}" for c in (min(copies), max(copies)))
        print(f"{r:5d} {spread:>24} {read / 1e12:9.3f} {ms:8.3f} {fraction:8.3f}  {state}", flush=True)
    RESULTS.mkdir(parents=True, exist_ok=True)
    out = {"gpu": gpu_name(), "smi_fields": SMI_FIELDS, "heat_s": args.heat_s, "rows": rows}
    (RESULTS / "floor_drift.json").write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()

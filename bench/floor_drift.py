"""Do the decode floor and the decode step drift together? On one GPU, in one process, round after round: the copy
bandwidth (the floor's rate), a read-only bandwidth, the batch-1 x 1k decode step, and the GPU's temperatures, with a
stretch of back-to-back copies between rounds to heat the memory.

    python -m bench.floor_drift --model DIR [--rounds 6] [--heat-s 15]

Why: record runs of one commit on different H200s read the copy bandwidth at 4.11-4.26 TB/s and the batch-1 step at
3.95-4.01 ms, so the decode fractions moved by 4%. If the floor's rate and the step move together on one machine, the
fraction is a stable measure and the spread is between machines; if the copy reading drifts alone, the floor is the
noise. The step is model_bench's (`decode_step`, `chained_step_ms`). Prints a table; writes
bench/results/floor_drift.json; no records. (The committed JSON, 2026-12-04, was measured by this script's first
version: the read bandwidth timed eagerly rather than in a graph, the pool's blocks in order rather than shuffled;
floor_drift_2026-12-04b.json by this one, 4 rounds with 10 s of heat, at 2665a29.)
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time

import torch

from bench.common import RESULTS, copy_bandwidth_samples, gpu_name, read_bandwidth
from bench.model_bench import chained_step_ms, decode_floor_bytes, decode_step
from kvstore.formats import parse_kv_dtype
from services.model.loader import load_model

SMI_FIELDS = "temperature.gpu,temperature.memory,clocks.sm,clocks.mem,power.draw,clocks_throttle_reasons.active"


def smi() -> str:
    index = str(torch.cuda.current_device())
    out = subprocess.run(["nvidia-smi", "-i", index, f"--query-gpu={SMI_FIELDS}", "--format=csv,noheader"],
                         capture_output=True, text=True)  # fmt: skip
    return out.stdout.strip()


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
    spec = parse_kv_dtype("int8", torch.bfloat16)
    runner, _, inputs = decode_step(model, spec, bs=1, ctx=1024, block_size=16)
    floor_bytes = decode_floor_bytes(model, spec, bs=1, ctx=1024)
    print(f"{gpu_name()}; nvidia-smi fields: {SMI_FIELDS}")
    print(f"{'round':>5} {'copy TB/s (3 pairs)':>24} {'read TB/s':>9} {'step ms':>8} {'fraction':>8}  nvidia-smi")
    rows = []
    for r in range(args.rounds):
        if r:
            heat(args.heat_s)
        state = smi()
        copies = copy_bandwidth_samples(3)
        read = read_bandwidth()
        ms = chained_step_ms(runner, inputs)
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

"""Run the paged decode attention kernel a few times at batch 32 x 4k, for Nsight Compute's hardware counters.

    ncu --clock-control none -k regex:_decode_split -s 2 -c 1 --section SpeedOfLight --section WarpStateStats \
        --section Occupancy python -m bench.ncu_decode_attention int8,bf16

(`--clock-control none`: the device's own clocks, as every other benchmark here runs.) What this showed on an H200
(2026-12-03), int8 KV, 2 stages: 62% of DRAM bandwidth, 0.39 warps issued per scheduler, long-scoreboard stalls
first, against 88% for bf16 KV: the int8 kernel waited on memory with too little of it in flight.
"""

from __future__ import annotations

import sys

import torch

from bench.tune_decode_attention import HEAD_DIM, setup
from kernels.triton_decode_attention import paged_decode_attention


def main() -> None:
    kv_dtypes = sys.argv[1].split(",") if len(sys.argv) > 1 else ["int8"]
    for kv in kv_dtypes:
        _, layer, tables, lens, q, _ = setup(32, 4096, kv)
        for _ in range(3):
            paged_decode_attention(q, layer, tables, lens, HEAD_DIM**-0.5, max_context_len=4096)
        torch.cuda.synchronize()


if __name__ == "__main__":
    main()

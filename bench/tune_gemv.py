"""Batch-1 decode's GEMMs are matrix-vector products that stream the weights once: can a Triton GEMV stream them
faster than cuBLAS? Sweeps a plain Triton GEMV's tile choices on the Llama-3-8B projection shapes.

    python -m bench.tune_gemv

Prints, per shape, cuBLAS's time and the best Triton variant's, both against the floor (weight bytes over the
measured copy bandwidth), plus the read-only bandwidth of a large reduction (what streaming reads can reach on this
GPU). Writes bench/results/tune_gemv.json; records nothing in summary.json.
"""

from __future__ import annotations

import itertools
import json

import torch

from bench.common import RESULTS, copy_bandwidth, gpu_name, graph_time_ms, read_bandwidth
from kernels import triton_gemv

# (name, out_features, in_features) of Llama-3-8B's merged projections and its lm_head
SHAPES = (("qkv", 6144, 4096), ("o", 4096, 4096), ("gate_up", 28672, 4096), ("down", 4096, 14336),
          ("lm_head", 128256, 4096))  # fmt: skip


def gemv(x, w, block_n, block_k, num_warps, num_stages):
    """kernels/triton_gemv.py's kernel at one tile choice."""
    tuning = {"block_n": block_n, "block_k": block_k, "num_warps": num_warps, "num_stages": num_stages}
    return triton_gemv.gemv(x, w, tuning=tuning)[0]


def main() -> None:
    bw = copy_bandwidth()
    rbw = read_bandwidth()
    print(f"{gpu_name()}: copy {bw / 1e12:.2f} TB/s, read-only reduction {rbw / 1e12:.2f} TB/s")
    results = {"gpu": gpu_name(), "copy_bandwidth": bw, "read_bandwidth": rbw, "shapes": []}
    grid = list(itertools.product((4, 8, 16, 32), (256, 512, 1024), (4, 8), (1, 3, 4)))
    for name, n, k in SHAPES:
        # Copies of the weight used in turn, >= 256 MB in all, so that no call finds its weight in L2 (50 MB on an
        # H200): a decode step reads each weight once, with every other weight in between.
        copies = max(1, -(-(256 << 20) // (n * k * 2)))
        ws = [torch.randn(n, k, dtype=torch.bfloat16, device="cuda") * 0.02 for _ in range(copies)]
        w = ws[0]
        x = torch.randn(1, k, dtype=torch.bfloat16, device="cuda")
        floor_ms = w.numel() * 2 / bw * 1e3
        ref = torch.nn.functional.linear(x.float(), w.float())[0]
        cublas_ms = graph_time_ms(lambda: [torch.nn.functional.linear(x, w_) for w_ in ws]) / copies  # noqa: B023
        rows = []
        for bn, bk, nw, ns in grid:
            if bn * bk > 16384:  # the fp32 accumulator alone would spill
                continue
            try:
                y = gemv(x, w, bn, bk, nw, ns)
                err = ((y.float() - ref).abs().max() / ref.abs().max()).item()
                assert err < 2e-2, f"wrong result {err}"
                ms = graph_time_ms(lambda: [gemv(x, w_, bn, bk, nw, ns) for w_ in ws]) / copies  # noqa: B023
                rows.append({"block_n": bn, "block_k": bk, "warps": nw, "stages": ns, "ms": ms, "err": err})
            except Exception as exc:
                rows.append({"block_n": bn, "block_k": bk, "warps": nw, "stages": ns, "error": str(exc)[:200]})
        best = min((r for r in rows if "ms" in r), key=lambda r: r["ms"])
        print(
            f"{name:8} {n}x{k}: floor {floor_ms * 1e3:7.1f} us | cuBLAS {cublas_ms * 1e3:7.1f} us "
            f"({floor_ms / cublas_ms:.3f}) | Triton {best['ms'] * 1e3:7.1f} us ({floor_ms / best['ms']:.3f}) {best}"
        )
        results["shapes"].append(
            {"name": name, "n": n, "k": k, "floor_ms": floor_ms, "cublas_ms": cublas_ms, "triton": rows}
        )
        w = ws = None
        torch.cuda.empty_cache()
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "tune_gemv.json").write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()

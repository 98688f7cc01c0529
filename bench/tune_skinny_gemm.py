"""Decode at batch 8-128 multiplies a few rows by each weight: can a Triton GEMM stream the weights faster than cuBLAS
there? Sweeps a plain tl.dot kernel, optionally split along K (float32 partials to a workspace, then one small kernel
sums them and casts: the structure a real split-K integration has), on the Llama-3-8B projection shapes.

    python -m bench.tune_skinny_gemm [--batches 64] [--shapes qkv,o,down]

Weight copies are used in turn so that no call finds its weight in L2. Times include the reduce kernel for split-K.
--no-sum times split-K without the sum kernel: what it would cost if the kernel after it summed the partials.
Writes bench/results/tune_skinny_gemm.json; records nothing in summary.json.
"""

from __future__ import annotations

import argparse
import itertools
import json

import torch
import triton
import triton.language as tl

from bench.common import RESULTS, copy_bandwidth, gpu_name, graph_time_ms

SHAPES = {"qkv": (6144, 4096), "o": (4096, 4096), "gate_up": (28672, 4096), "down": (4096, 14336)}


@triton.jit
def _skinny_kernel(x_ptr, w_ptr, y_ptr, M, N, K, k_len, stride_xm, stride_wn, BLOCK_M: tl.constexpr,
                   BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, SPLIT: tl.constexpr):  # fmt: skip
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    offs_m = tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    k_start = pid_k * k_len
    x_ptrs = x_ptr + offs_m[:, None] * stride_xm + (k_start + offs_k)[None, :]
    w_ptrs = w_ptr + offs_n[None, :].to(tl.int64) * stride_wn + (k_start + offs_k)[:, None]
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for k0 in range(0, k_len, BLOCK_K):
        x = tl.load(x_ptrs + k0, mask=offs_m[:, None] < M, other=0.0)
        w = tl.load(w_ptrs + k0)
        acc = tl.dot(x, w, acc)
    mask = offs_m[:, None] < M
    if SPLIT:  # float32 partial of split pid_k: workspace [splits, M, N]
        tl.store(y_ptr + (pid_k * M + offs_m[:, None]) * N + offs_n[None, :], acc, mask=mask)
    else:
        tl.store(y_ptr + offs_m[:, None] * N + offs_n[None, :], acc.to(y_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _sum_splits_kernel(ws_ptr, y_ptr, MN, SPLITS: tl.constexpr, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < MN
    acc = tl.zeros([BLOCK], dtype=tl.float32)
    for s in tl.static_range(SPLITS):
        acc += tl.load(ws_ptr + s * MN + offs, mask=mask, other=0.0)
    tl.store(y_ptr + offs, acc.to(y_ptr.dtype.element_ty), mask=mask)


def skinny(x, w, block_n, block_k, split_k, num_warps, num_stages, sum_splits=True):
    m, k = x.shape
    n = w.shape[0]
    block_m = max(16, triton.next_power_of_2(m))
    y = torch.empty(m, n, dtype=x.dtype, device=x.device)
    ws = y if split_k == 1 else torch.empty(split_k, m, n, dtype=torch.float32, device=x.device)
    _skinny_kernel[(n // block_n, split_k)](
        x, w, ws, m, n, k, k // split_k, x.stride(0), w.stride(0), BLOCK_M=block_m, BLOCK_N=block_n,
        BLOCK_K=block_k, SPLIT=split_k > 1, num_warps=num_warps, num_stages=num_stages,
    )  # fmt: skip
    if split_k > 1 and not sum_splits:
        return ws  # the float32 partials, for a consumer that sums them itself (--no-sum)
    if split_k > 1:
        _sum_splits_kernel[(triton.cdiv(m * n, 1024),)](ws, y, m * n, SPLITS=split_k, BLOCK=1024, num_warps=4)
    return y


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batches", default="64")
    parser.add_argument("--shapes", default=",".join(SHAPES))
    parser.add_argument(
        "--no-sum",
        action="store_true",
        help="time split-K without its sum kernel (as if the next kernel summed the partials)",
    )
    args = parser.parse_args()
    summed = not args.no_sum
    bw = copy_bandwidth()
    print(f"{gpu_name()}: copy {bw / 1e12:.2f} TB/s")
    out = {"gpu": gpu_name(), "copy_bandwidth": bw, "rows": []}
    # (block_n, block_k, stages) kept under ~200 KB of shared memory at 64 rows; split_k 1/2/4/8; 4 warps.
    tiles = [(bn, bk, st) for bn, bk, st in itertools.product((16, 32, 64, 128), (64, 128, 256), (3, 4, 6))
             if st * (64 + bn) * bk * 2 <= 200 * 1024]  # fmt: skip
    for m in (int(b) for b in args.batches.split(",")):
        for name in args.shapes.split(","):
            n, k = SHAPES[name]
            copies = max(1, -(-(256 << 20) // (n * k * 2)))
            ws = [torch.randn(n, k, dtype=torch.bfloat16, device="cuda") * 0.02 for _ in range(copies)]
            x = torch.randn(m, k, dtype=torch.bfloat16, device="cuda")
            floor_ms = n * k * 2 / bw * 1e3
            ref = torch.nn.functional.linear(x.float(), ws[0].float())
            cublas = graph_time_ms(lambda: [torch.nn.functional.linear(x, w_) for w_ in ws]) / copies  # noqa: B023
            best = None
            for (bn, bk, ns), sk in itertools.product(tiles, (1, 2, 4, 8)):
                if (k // sk) % bk or n % bn:
                    continue
                row = {"m": m, "shape": name, "block_n": bn, "block_k": bk, "split_k": sk, "stages": ns}
                try:
                    y = skinny(x, ws[0], bn, bk, sk, 4, ns, summed)
                    y = y.sum(0) if y.dim() == 3 else y
                    err = ((y.float() - ref).abs().max() / ref.abs().max()).item()
                    assert err < 2e-2, f"wrong result {err}"
                    ms = graph_time_ms(lambda: [skinny(x, w_, bn, bk, sk, 4, ns, summed) for w_ in ws]) / copies  # noqa: B023
                    row |= {"ms": ms, "fraction": floor_ms / ms}
                    if best is None or ms < best["ms"]:
                        best = row
                except Exception as exc:
                    row["error"] = str(exc)[:160]
                out["rows"].append(row)
            out["rows"].append({"m": m, "shape": name, "cublas_ms": cublas, "fraction": floor_ms / cublas})
            top = sorted((r for r in out["rows"] if r.get("shape") == name and "ms" in r and r["m"] == m),
                         key=lambda r: r["ms"])[:5]  # fmt: skip
            print(f"m={m} {name:8}: floor {floor_ms * 1e3:6.1f} us | cuBLAS {cublas * 1e3:6.1f} us "
                  f"({floor_ms / cublas:.3f})", flush=True)  # fmt: skip
            for r in top:
                print(f"    {r['ms'] * 1e3:6.1f} us ({r['fraction']:.3f}) bn {r['block_n']} bk {r['block_k']} "
                      f"split {r['split_k']} stages {r['stages']}", flush=True)  # fmt: skip
            ws = None
            torch.cuda.empty_cache()
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "tune_skinny_gemm.json").write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()

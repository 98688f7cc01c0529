"""What every benchmark shares: the floors (measured copy bandwidth and bf16 matmul rate), device-event timing,
and the results file bench/results/summary.json ({"records": [...]}, one record per name, newest wins)."""

from __future__ import annotations

import json
import os
import statistics
import subprocess
from datetime import date
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"
SUMMARY = RESULTS / "summary.json"


def gpu_name() -> str:
    return torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"


def commit() -> str:
    """The checkout's commit; KVRELAY_COMMIT where the tree travels without .git (the GPU machine)."""
    if os.environ.get("KVRELAY_COMMIT"):
        return os.environ["KVRELAY_COMMIT"]
    try:
        return subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=ROOT
        ).stdout.strip()
    except OSError:
        return ""


def time_ms(fn, warmup: int = 5, iters: int = 30) -> float:
    """Median milliseconds of fn() measured with device events (wall clock on the CPU)."""
    for _ in range(warmup):
        fn()
    times = []
    if torch.cuda.is_available():
        for _ in range(iters):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
    else:
        import time

        for _ in range(iters):
            t = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t) * 1e3)
    return statistics.median(times)


def graph_time_ms(fn, iters: int = 20, warmup: int = 3) -> float:
    """Median ms of fn() replayed from a CUDA graph of `iters` back-to-back calls, divided by iters: the kernels'
    own time, without Python launch overhead (which a decode step pays once per graph, not per kernel)."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(iters):
            fn()
    return time_ms(graph.replay, warmup=2, iters=10) / iters


def copy_bandwidth_samples(samples: int = 5) -> list[float]:
    """Bytes/s of a device-to-device copy (read + write counted) of a 2 GiB random buffer, once for each of `samples`
    fresh pairs of buffers (each the median of 20 timed copies)."""
    rates = []
    n = 2**31
    for _ in range(samples):
        src = torch.randint(0, 255, (n,), dtype=torch.uint8, device="cuda")
        dst = torch.empty_like(src)
        ms = time_ms(lambda s=src, d=dst: d.copy_(s), warmup=3, iters=20)
        rates.append(2 * n / (ms / 1e3))
        src = dst = None  # free 4 GiB before the next pair (and before the model loads)
        torch.cuda.empty_cache()
    return rates


def copy_bandwidth(samples: int = 5) -> float:
    """The decode floor's rate: the median of `copy_bandwidth_samples`. One pair of buffers is not enough: six fresh
    pairs in one process on one H200 read 4.14-4.23 TB/s (2026-12-04), and a single reading moved every decode
    fraction by up to 1% between runs; the median of five keeps the floor from riding on one lucky or unlucky
    placement."""
    return statistics.median(copy_bandwidth_samples(samples))


def read_bandwidth() -> float:
    """Bytes/s of summing a 4 GiB bf16 buffer: reads only."""
    t = torch.randn(2**31, dtype=torch.bfloat16, device="cuda")
    ms = graph_time_ms(lambda: t.sum(dtype=torch.float32), iters=5)
    t = None
    torch.cuda.empty_cache()
    return 2**32 / (ms / 1e3)


def matmul_rate() -> float:
    """FLOP/s of a bf16 8192^3 matmul on random data: the prefill floor's rate."""
    a = torch.randn(8192, 8192, dtype=torch.bfloat16, device="cuda")
    b = torch.randn(8192, 8192, dtype=torch.bfloat16, device="cuda")
    ms = time_ms(lambda: a @ b, warmup=5, iters=20)
    return 2 * 8192**3 / (ms / 1e3)


def record(name: str, value: float, unit: str, floor: float, fraction: float, command: str, **extra) -> dict:
    """Add or replace a record in summary.json and print it."""
    rec = {
        "name": name,
        "gpu": gpu_name(),
        "value": round(value, 4),
        "unit": unit,
        "floor": round(floor, 4),
        "fraction": round(fraction, 4),
        "command": command,
        "date": date.today().isoformat(),
        "commit": commit(),
    } | extra
    RESULTS.mkdir(parents=True, exist_ok=True)
    data = json.loads(SUMMARY.read_text()) if SUMMARY.exists() else {"records": []}
    data["records"] = [r for r in data["records"] if r["name"] != name] + [rec]
    SUMMARY.write_text(json.dumps(data, indent=2))
    print(f"{name:<28} {value:>10.3f} {unit:<8} floor {floor:>10.3f}  fraction {fraction:6.3f}")
    return rec


def write_benchmarks_md() -> None:
    """Regenerate the table between the markers of BENCHMARKS.md; the prose around it is written by hand."""
    data = json.loads(SUMMARY.read_text())
    lines = [
        "| record | value | unit | floor | fraction | GPU | date | commit | command |",
        "|---|---:|---|---:|---:|---|---|---|---|",
    ]
    for r in sorted(data["records"], key=lambda r: r["name"]):
        lines.append(
            f"| `{r['name']}` | {r['value']:.3f} | {r['unit']} | {r['floor']:.3f} | {r['fraction']:.3f} | {r['gpu']} "
            f"| {r['date']} | {r['commit']} | `{r['command']}` |"
        )
    path = ROOT / "BENCHMARKS.md"
    text = path.read_text() if path.exists() else "# Benchmarks\n\n<!-- table -->\n<!-- /table -->\n"
    head, _, rest = text.partition("<!-- table -->")
    _, _, tail = rest.partition("<!-- /table -->")
    path.write_text(head + "<!-- table -->\n" + "\n".join(lines) + "\n<!-- /table -->" + tail)

"""Disaggregation on one GPU against the colocated baseline, and multi-turn KV reuse, through `kvrelay up`.

    python -m bench.serve_modes --model DIR --modes colocated,disaggregated,mps [--multiturn]

For each mode: Poisson arrivals of 2k-8k-token prompts with 256-token outputs (`kvrelay bench serve`), goodput at
the given SLOs, and decode's ITL p99 while some prefill was running over its ITL p99 while none was, in the same run
(same batch, same contexts: only the prefill traffic differs). Also, as before, the loaded ITL p99 over that of a
quiet run (8 closed-loop streams of 64-token prompts): that ratio also counts the loaded run's larger batch and
40-130x longer contexts (more attention bytes a step), so it is not interference alone; it goes with the records.
Records `interference_itl_p99_ratio` and `goodput_ratio_vs_colocated` (the disaggregated mode with the most goodput,
for both), `interference_itl_p99_ratio_colocated`, and with --multiturn `multiturn_ttft_ratio` (TTFT of turn 10
over a 4k-token history: recompute / reuse).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

from bench.common import RESULTS, record, write_benchmarks_md
from bench.sweep import SWEEP_JSON, load, plot, rate_point, stamp, sweep_records
from kvrelay.client import Client
from kvrelay.deployment import Deployment
from kvrelay.loadgen.report import RequestRecord, Slo

ROOT = Path(__file__).resolve().parent.parent

COMMAND = "python -m bench.serve_modes --model DIR"
SWEEP_COMMAND = "python -m bench.serve_modes --model DIR --sweep RATES --modes disaggregated,colocated@4096,..."


def mode_flags(mode: str, args) -> list[str]:
    """colocated, disaggregated (the default deployment: the split adapts, SLO admission on), fixed (disaggregated
    with --no-split), mps (prefill gets --prefill-sm-pct of the SMs), mpsNN (prefill gets NN%) or mpsNNdDD (and decode
    DD%); a `-noadm` suffix turns the SLO admission off (--slo-ttft-ms 0); any of them may end in @CHUNK, its prefill
    token budget (`split_mode`)."""
    if mode.endswith("-noadm"):
        return [*mode_flags(mode.removesuffix("-noadm"), args), "--slo-ttft-ms", "0"]
    if mode in ("colocated", "disaggregated"):
        return ["--mode", mode]
    if mode == "fixed":
        return ["--mode", "disaggregated", "--no-split"]
    if mode.startswith("mps"):
        pct, _, decode_pct = mode[3:].partition("d")  # mpsNNdDD: decode gets DD% (default all of them)
        pct = pct or str(args.prefill_sm_pct)
        return ["--mode", "disaggregated", "--mps", "--decode-sm-pct", decode_pct or "100", "--prefill-sm-pct", pct]
    raise SystemExit(f"unknown mode {mode!r}: colocated, disaggregated, mps, mpsNN or mpsNNdDD")


# Fewest gaps on each side of the split for its p99 to mean something (10 samples above it).
MIN_GAPS = 1000

# Per-token SLOs (mean ITL of a request, ms) at which goodput is also reported, beside the one given as a flag.
ITL_SLO_GRID = (10, 15, 20, 30, 40)


def goodput_by_itl_slo(data: dict, slo_ttft_ms: float) -> dict[str, float]:
    """Requests/s that met TTFT <= slo_ttft_ms and each per-token SLO of ITL_SLO_GRID, from the load generator's
    per-request records (its JSON document)."""
    measured = [RequestRecord.from_json(r) for r in data["requests"] if not r["warmup"]]
    elapsed = data["summary"]["elapsed_s"]
    return {str(itl): sum(Slo(slo_ttft_ms, itl).met_by(r) for r in measured) / elapsed for itl in ITL_SLO_GRID}


def loadgen(address: str, label: str, *flags: str) -> dict:
    """Runs `kvrelay bench serve` and returns its JSON document (summary and per-request records)."""
    cmd = [
        sys.executable,
        "-m",
        "kvrelay.cli",
        "bench",
        "serve",
        "--address",
        address,
        "--label",
        label,
        "--out",
        str(RESULTS),
        "--no-progress",
        *flags,
    ]
    subprocess.run(cmd, check=True)
    return json.loads((RESULTS / f"serve_{label}.json").read_text())


def split_mode(mode: str, args) -> tuple[str, int]:
    """'mps50@512' -> ('mps50', 512): a mode and its prefill token budget (default --chunk)."""
    name, _, chunk = mode.partition("@")
    return name, int(chunk or args.chunk)


def run_mode(model: str, mode: str, args) -> dict:
    name, chunk = split_mode(mode, args)
    label = mode.replace("@", "_chunk")
    d = Deployment(
        "--model",
        model,
        "--kv-dtype",
        "int8",
        "--max-model-len",
        "10240",
        "--kv-cache-mb",
        "40000",
        "--max-batch-tokens",
        str(chunk),
        *mode_flags(name, args),
    )
    try:
        prime(d.address, chunk)
        if args.multiturn_only:  # A/B of the reuse path alone: no load runs, no records
            return {"multiturn": measure_multiturn(d.address)}
        quiet = loadgen(
            d.address,
            f"{label}_quiet",
            "--concurrency",
            "8",
            "--prompt-len",
            "64",
            "--output-len",
            "256",
            "--warmup",
            "5",
            "--duration",
            "15",
        )["summary"]
        loaded_run = loadgen(
            d.address,
            f"{label}_load",
            "--rate",
            str(args.rate),
            "--prompt-len",
            "2048:8192",
            "--output-len",
            "256",
            "--warmup",
            "5",
            "--duration",
            str(args.duration),
            "--slo-ttft-ms",
            str(args.slo_ttft_ms),
            "--slo-itl-ms",
            str(args.slo_itl_ms),
            "--seed",
            "1",
        )
        multiturn = measure_multiturn(d.address) if args.multiturn and name != "colocated" else None
    finally:
        d.stop()
    loaded = loaded_run["summary"]
    during, outside = loaded["itl_ms_prefill_running"], loaded["itl_ms_no_prefill"]
    out = {
        "rate": args.rate,
        "quiet_itl_p99": quiet["itl_ms"]["p99"],
        "load_itl_p99": loaded["itl_ms"]["p99"],
        "ratio_vs_quiet_run": loaded["itl_ms"]["p99"] / quiet["itl_ms"]["p99"],
        "itl_p99_prefill_running": during["p99"],
        "itl_p99_no_prefill": outside["p99"],
        "gaps_prefill_running": during["count"],
        "gaps_no_prefill": outside["count"],
        # None when either side has too few gaps for a p99 (prefill never idle, or never running)
        "ratio": during["p99"] / outside["p99"] if min(during["count"], outside["count"]) >= MIN_GAPS else None,
        "goodput": loaded["goodput"]["requests_per_s"],
        "goodput_by_itl_slo": goodput_by_itl_slo(loaded_run, args.slo_ttft_ms),
        "load": loaded,
        "multiturn": multiturn,
    }
    print(
        f"{mode}: ITL p99 loaded {out['load_itl_p99']:.1f} ms: prefill running {during['p99']} ms ({during['count']} "
        f"gaps), none {outside['p99']} ms ({outside['count']} gaps), ratio {out['ratio']}; quiet run "
        f"{out['quiet_itl_p99']:.1f} ms (ratio {out['ratio_vs_quiet_run']:.2f}); goodput {out['goodput']:.2f} "
        f"req/s; server prefill p50 {loaded['server_ms']['prefill_ms']['p50']:.0f} ms"
    )
    return out


def run_sweep(model: str, mode: str, rates: list[float], args, save=lambda points: None) -> dict:
    """One deployment of `mode`, primed, then a load run at each rate in turn (each drained before the next):
    rate -> point (bench/sweep.py rate_point), and the multi-turn TTFTs when asked."""
    name, chunk = split_mode(mode, args)
    label = mode.replace("@", "_chunk")
    print(f"{stamp()} sweep {mode}: starting the deployment", flush=True)
    d = Deployment(*deployment_flags(model, chunk), *mode_flags(name, args), "--max-restarts", "0")
    points: dict[str, dict] = {}
    try:
        prime(d.address, chunk)
        for rate in rates:
            print(f"{stamp()} sweep {mode}: {rate:g} req/s", flush=True)
            run = loadgen(
                d.address,
                f"sweep_{label}_rate{rate:g}",
                "--rate", str(rate), "--prompt-len", "2048:8192", "--output-len", "256",
                "--warmup", str(args.warmup), "--duration", str(args.duration),
                "--drain-timeout", str(args.drain_timeout),
                "--slo-ttft-ms", str(args.slo_ttft_ms), "--slo-itl-ms", str(args.slo_itl_ms),
                "--seed", "1", "--no-plots",
            )  # fmt: skip
            points[f"{rate:g}"] = rate_point(run, rate)
            save(points)  # after each rate: a device call cut short keeps what it measured
            p = points[f"{rate:g}"]
            print(
                f"{stamp()} {mode} @ {rate:g} req/s: goodput {p['goodput']:.2f} ({100 * p['fraction_in_slo']:.0f}% in "
                f"SLO), errors {p['errors']}, TTFT p50/p99 {p['ttft_p50']:.0f}/{p['ttft_p99']:.0f} ms, ITL p99 "
                f"{p['itl_p99']:.1f} ms, interference {p['interference']}",
                flush=True,
            )
        if args.multiturn and name != "colocated":
            points["multiturn"] = measure_multiturn(d.address)
    finally:
        if os.environ.get("OUT"):  # the GPU machine: the deployment's log (the split's moves) comes back
            Path(os.environ["OUT"], f"sweep_{label}.log").write_text(d.output())
        d.stop()
    return points


def deployment_flags(model: str, chunk: int) -> list[str]:
    """The deployment every mode shares: the 8B shape with int8 KV, 10k context, a 40 GB pool."""
    return ["--model", model, "--kv-dtype", "int8", "--max-model-len", "10240", "--kv-cache-mb", "40000",
            "--max-batch-tokens", str(chunk)]  # fmt: skip


def sweep_main(args) -> None:
    """--sweep RATES: every mode of --modes over every rate, merged into bench/results/serve_sweep.json (so that
    modes measured in separate device calls on one machine combine), then the records and the plot."""
    rates = [float(r) for r in args.sweep.split(",")]
    sweeps = load(SWEEP_JSON)
    for mode in [m for m in args.modes.split(",") if m]:

        def save(points: dict, mode: str = mode) -> None:
            SWEEP_JSON.write_text(json.dumps(sweeps | {mode: points}, indent=1))

        sweeps[mode] = run_sweep(args.model, mode, rates, args, save)
        save(sweeps[mode])
    finish_sweep(sweeps, args)


def finish_sweep(sweeps: dict, args) -> None:
    curves = {m: {r: p for r, p in pts.items() if r != "multiturn"} for m, pts in sweeps.items()}
    slo = f"TTFT <= {args.slo_ttft_ms:g} ms, mean ITL <= {args.slo_itl_ms:g} ms"
    gpu = {"gpu": args.gpu} if args.gpu else {}  # --plot-only on another machine: the sweep's GPU, not this one's
    sweep_records(curves, args.sweep_mode, SWEEP_COMMAND, slo, **gpu)
    mt = sweeps.get(args.sweep_mode, {}).get("multiturn")
    if mt:
        ratio = mt["recompute_ttft_ms"] / mt["reuse_ttft_ms"]
        record("multiturn_ttft_ratio", ratio, "x", 5.0, ratio / 5.0, SWEEP_COMMAND, mode=args.sweep_mode, **mt, **gpu)
    plot(curves, RESULTS / "serve_sweep.png", f"2k-8k-token prompts, 256-token outputs, int8 KV; {slo}")
    write_benchmarks_md()


def prime(address: str, chunk: int) -> None:
    """One prompt of each chunk shape the load will run (a full chunk, a remainder, the longest prompt), before any
    timing: on a fresh machine Triton compiles each new kernel shape on first use (seconds), and a stall at the start
    of a load run near saturation leaves a queue that the measured window then inherits."""
    gen = torch.Generator().manual_seed(5)
    with Client(address) as client:
        for n in (2048, chunk + 100, 8192):
            ids = torch.randint(100, 120000, (n,), generator=gen).tolist()
            client.complete(prompt_token_ids=ids, max_tokens=2, ignore_eos=True)


def measure_multiturn(address: str, history: int = 4096, turn_tokens: int = 64, turns: int = 10) -> dict:
    """Turn 10 of a chat whose history is 4k tokens plus 64 per turn: TTFT with the session's KV vs recomputed."""
    gen = torch.Generator().manual_seed(3)
    tokens = torch.randint(100, 120000, (history,), generator=gen).tolist()
    session = f"mt{int(time.time())}"
    reuse, recompute = [], []
    with Client(address) as client:
        for _ in range(turns):
            tokens += torch.randint(100, 120000, (turn_tokens,), generator=gen).tolist()
            reply = client.complete(prompt_token_ids=tokens, max_tokens=16, ignore_eos=True, session_id=session)
            tokens += list(reply.token_ids)
        for _ in range(3):  # turn 10 again, three times each way
            tokens += torch.randint(100, 120000, (turn_tokens,), generator=gen).tolist()
            r = client.complete(prompt_token_ids=tokens, max_tokens=2, ignore_eos=True, session_id=session)
            reuse.append(r.finish.timings.ttft_ms)
            tokens += list(r.token_ids)
            full = client.complete(prompt_token_ids=tokens, max_tokens=2, ignore_eos=True)
            recompute.append(full.finish.timings.ttft_ms)
    out = {
        "reuse_ttft_ms": statistics.median(reuse),
        "recompute_ttft_ms": statistics.median(recompute),
        "cached_prompt_tokens": r.finish.cached_prompt_tokens,
        # where a reused turn's TTFT goes (the last one): queue, prefill compute, the rest is gRPC, Redis, the gateway
        "reuse_queue_ms": r.finish.timings.queue_ms,
        "reuse_prefill_ms": r.finish.timings.prefill_ms,
        "recompute_prefill_ms": full.finish.timings.prefill_ms,
        "prompt_tokens": r.finish.prompt_tokens,
    }
    print(f"multi-turn: turn TTFT reuse {out['reuse_ttft_ms']:.1f} ms, recompute {out['recompute_ttft_ms']:.1f} ms")
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", help="the checkpoint (required unless --plot-only)")
    parser.add_argument(
        "--sweep", help="RATES, comma-separated req/s: each mode of --modes at each rate (one deployment)"
    )
    parser.add_argument("--sweep-mode", default="disaggregated", help="the mode the sweep records are about")
    parser.add_argument("--warmup", type=float, default=5)
    parser.add_argument("--drain-timeout", type=float, default=15, help="sweep: seconds open requests may take")
    parser.add_argument("--plot-only", action="store_true", help="records and plot from bench/results/serve_sweep.json")
    parser.add_argument("--gpu", help="with --plot-only: the GPU the sweep ran on (the records name it)")
    parser.add_argument("--modes", default="colocated,disaggregated,mps", help="also mpsNN, mpsNNdDD (SM shares)")
    parser.add_argument("--rate", type=float, default=3.0, help="req/s: keeps prefill about half busy on an H200")
    parser.add_argument("--duration", type=float, default=40)
    parser.add_argument("--chunk", type=int, default=2048, help="prefill token budget per forward pass")
    parser.add_argument("--slo-ttft-ms", type=float, default=2000)
    # 20 ms a token (50 tokens/s, ~3x the unloaded inter-token latency): the product's promise is that long prompts do
    # not slow running streams. (Set after the first H200 run, which used 40 ms and where every request met it in
    # every mode; both are in the record's ratio_by_itl_slo_ms.)
    parser.add_argument("--slo-itl-ms", type=float, default=20)
    parser.add_argument("--multiturn", action="store_true")
    parser.add_argument("--multiturn-only", action="store_true", help="only the multi-turn TTFTs, printed")
    parser.add_argument("--merge", help="JSON of modes measured earlier: read, extended, written back")
    parser.add_argument("--prefill-sm-pct", type=int, default=60, help="mps mode: prefill's share of the SMs")
    args = parser.parse_args()
    if args.plot_only:
        return finish_sweep(load(SWEEP_JSON), args)
    if not args.model:
        parser.error("--model is required")
    if args.sweep:
        return sweep_main(args)
    # --merge FILE: modes measured by an earlier call (a GPU machine's calls are time-limited), rewritten with these.
    results = json.loads(Path(args.merge).read_text()) if args.merge and Path(args.merge).exists() else {}
    for r in results.values():  # measured before the in-run split: their "ratio" was the one against the quiet run
        if "ratio_vs_quiet_run" not in r:
            r["ratio_vs_quiet_run"], r["ratio"] = r["ratio"], None
    if args.multiturn_only:
        for mode in args.modes.split(","):
            print(mode, json.dumps(run_mode(args.model, mode, args)))
        return
    results |= {mode: run_mode(args.model, mode, args) for mode in args.modes.split(",") if mode}
    results = {m: {k: v for k, v in r.items() if k != "load"} for m, r in results.items()}
    (RESULTS / "serve_modes.json").write_text(json.dumps(results, indent=2))
    if args.merge:
        Path(args.merge).write_text(json.dumps(results, indent=2))
    # Each side at its best setting: colocated runs (any chunk) against disaggregated ones; the disaggregated mode with
    # the most goodput gives both of its records (a mode that falls behind the load decodes a smaller batch).
    coloc = [m for m in results if split_mode(m, args)[0] == "colocated"]
    disagg = [m for m in results if m not in coloc]
    ratio = {m: results[m].get("ratio") for m in results}
    if coloc and any(ratio[m] for m in coloc):
        c = min((m for m in coloc if ratio[m]), key=ratio.get)
        record("interference_itl_p99_ratio_colocated", ratio[c], "x", 1.25, 1.25 / ratio[c], COMMAND, mode=c,
               ratio_vs_quiet_run=results[c].get("ratio_vs_quiet_run"))  # fmt: skip
    if disagg:
        top = max(disagg, key=lambda m: results[m]["goodput"])
        name, chunk = split_mode(top, args)
        setting = " ".join(mode_flags(name, args)) + f" --max-batch-tokens {chunk}"
        r = results[top]
        if r.get("ratio"):
            record(
                "interference_itl_p99_ratio",
                r["ratio"],
                "x",
                1.25,
                1.25 / r["ratio"],
                COMMAND,
                mode=setting,
                rate=r["rate"],
                definition="ITL p99 of gaps with a prefill running / without, same run",
                itl_p99_prefill_running_ms=r["itl_p99_prefill_running"],
                itl_p99_no_prefill_ms=r["itl_p99_no_prefill"],
                ratio_vs_quiet_run=r.get("ratio_vs_quiet_run"),
                quiet_itl_p99_ms=r["quiet_itl_p99"],
                load_itl_p99_ms=r["load_itl_p99"],
                ratio_by_mode={m: ratio[m] and round(ratio[m], 3) for m in results},
            )
        base = max(coloc, key=lambda m: results[m]["goodput"], default=None)
        if base is not None and results[base]["goodput"] > 0:
            g = r["goodput"] / results[base]["goodput"]
            by_slo = {
                slo: max(results[m]["goodput_by_itl_slo"][str(slo)] for m in disagg)
                / max(max(results[m]["goodput_by_itl_slo"][str(slo)] for m in coloc), 1e-9)
                for slo in ITL_SLO_GRID
            }
            record(
                "goodput_ratio_vs_colocated",
                g,
                "x",
                1.5,
                g / 1.5,
                COMMAND,
                slo=f"TTFT <= {args.slo_ttft_ms:g} ms, mean ITL <= {args.slo_itl_ms:g} ms",
                rate=r["rate"],
                modes=f"{top} over {base}",
                ratio_by_itl_slo_ms={str(k): round(v, 3) for k, v in by_slo.items()},
            )
        # The mode of the other two records when it was measured (else the best); every mode's ratio goes with it (it
        # moves with the prefill speed: the slower a recompute, the more reuse saves).
        by_mode = {
            m: results[m]["multiturn"]["recompute_ttft_ms"] / results[m]["multiturn"]["reuse_ttft_ms"]
            for m in disagg
            if results[m].get("multiturn")
        }
        if by_mode:
            mode = top if top in by_mode else max(by_mode, key=by_mode.get)
            ratio = by_mode[mode]
            rounded = {m: round(v, 2) for m, v in by_mode.items()}
            record("multiturn_ttft_ratio", ratio, "x", 5.0, ratio / 5.0, COMMAND, mode=mode, ratio_by_mode=rounded,
                   **results[mode]["multiturn"])  # fmt: skip
    write_benchmarks_md()


if __name__ == "__main__":
    main()

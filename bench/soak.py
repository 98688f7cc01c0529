"""Soak: N concurrent Generate streams for minutes against one deployment; outcomes by gRPC status.

    python -m bench.soak                                   # 1000 streams, 180 s, a fresh CPU deployment
    python -m bench.soak --concurrency 200 --duration 60
    python -m bench.soak --up-flags "--slo-ttft-ms 20000 --slo-itl-ms 2000"   # flags of the started `kvrelay up`
    python -m bench.soak --address HOST:PORT [--name NAME --redis-url URL]   # a running deployment (audit with --name)

Closed loop: N client tasks, each sends a Generate call through `kvrelay.AsyncClient` (a short random prompt, a few
tokens) and sends the next one when it ends, until --duration is over; then the calls in flight finish (each has
--timeout as its deadline). A refused call (RESOURCE_EXHAUSTED, UNAVAILABLE) is sent again after a pause, as a polite
client would: --backoff seconds, doubled for each refusal in a row up to --backoff-max, jittered; --backoff 0 hammers
(every refusal is answered by a new call at once, which on 2 cores costs the served requests most of the CPU).

Printed at the end, and written to bench/results/soak_<date>.json: outcomes by status with a sample of each non-OK
status's message, tokens/s, TTFT, ITL and end-to-end percentiles of OK streams (client clock), whether a process
restarted (pids and registry worker ids before and after), SessionStore.audit() after the load drained, the machine
(CPU count, GPU, load average). The issue's target (19): every request OK or RESOURCE_EXHAUSTED, none UNKNOWN or
INTERNAL.
Exit status 1 when a call ended UNKNOWN or INTERNAL, an OK stream lost its finish or tokens, a process restarted, the
deployment logged a traceback, the audit is not clean, or the started deployment did not stop cleanly (exit status,
processes, /dev/shm regions, its log or Redis keys left behind).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import platform
import random
import re
import shlex
import shutil
import subprocess
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from datetime import date
from pathlib import Path

import grpc
import numpy as np

from kvrelay import AsyncClient
from kvrelay.deployment import REDIS_URL, Deployment
from kvrelay.loadgen.report import spread_token_times
from kvrelay.v1 import gateway_pb2

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"
FORBIDDEN = ("UNKNOWN", "INTERNAL")
RETRY_LATER = ("RESOURCE_EXHAUSTED", "UNAVAILABLE")  # statuses a polite client backs off from
SAMPLES = 3  # messages kept per non-OK status
WORDS = (
    "the cat river light stone quick blue seven apple market story garden winter engine music paper over under "
    "why how tell me about a short poem list three facts explain simply count from one to"
).split()


@dataclass
class Tally:
    """Everything the streams report, shared by all client tasks (one event loop: no locks)."""

    outcomes: Counter = field(default_factory=Counter)
    samples: dict[str, list[str]] = field(default_factory=dict)
    ttft_ms: list[float] = field(default_factory=list)
    itl_ms: list[float] = field(default_factory=list)
    e2e_ms: list[float] = field(default_factory=list)
    ok_tokens: int = 0
    all_tokens: int = 0
    in_flight: int = 0
    max_in_flight: int = 0

    def add(self, status: str, detail: str = "") -> None:
        self.outcomes[status] += 1
        if status != "OK" and len(kept := self.samples.setdefault(status, [])) < SAMPLES and detail not in kept:
            kept.append(detail)


def random_request(rng: random.Random, max_tokens: int) -> dict:
    """Short prompts (a few words, as text or as a chat turn), 1..max_tokens tokens, greedy or seeded sampling."""
    text = " ".join(rng.choice(WORDS) for _ in range(rng.randint(2, 16)))
    prompt = {"prompt": text} if rng.random() < 0.5 else {"messages": [{"role": "user", "content": text}]}
    sampling = {} if rng.random() < 0.5 else {"temperature": 0.8, "seed": rng.randrange(2**32)}
    return prompt | sampling | {"max_tokens": rng.randint(1, max_tokens)}


async def one_stream(client: AsyncClient, rng: random.Random, args, tally: Tally) -> str:
    """One Generate call to its end; returns its status name (OK_WITHOUT_FINISH / TOKENS_LOST: an OK that lied)."""
    request = random_request(rng, args.max_tokens)
    tally.in_flight += 1
    tally.max_in_flight = max(tally.max_in_flight, tally.in_flight)
    start = time.perf_counter()
    messages: list[tuple[float, int]] = []
    finish = None
    try:
        async for m in client.generate(timeout=args.timeout, **request):
            messages.append((time.perf_counter(), len(m.token_ids)))
            if m.HasField("finish"):
                finish = m.finish
    except grpc.aio.AioRpcError as exc:
        status, detail = exc.code().name, exc.details() or ""
    except Exception as exc:  # our bug, not the server's status: counted apart, and the soak goes on
        status, detail = "CLIENT_ERROR", repr(exc)
    else:
        received = sum(n for _, n in messages)
        status, detail = "OK", ""
        if finish is None:
            status, detail = "OK_WITHOUT_FINISH", f"{received} tokens, no finish"
        elif finish.completion_tokens != received:
            status, detail = "TOKENS_LOST", f"finish says {finish.completion_tokens} tokens, {received} received"
    finally:
        tally.in_flight -= 1
    received = sum(n for _, n in messages)
    tally.all_tokens += received
    if status == "OK":
        tally.ok_tokens += received
        tally.ttft_ms.append((messages[0][0] - start) * 1e3)
        tally.e2e_ms.append((time.perf_counter() - start) * 1e3)
        times = spread_token_times(messages)
        tally.itl_ms.extend((b - a) * 1e3 for a, b in zip(times, times[1:], strict=False))
    tally.add(status, detail)
    return status


async def client_loop(client: AsyncClient, seed: int, end: float, args, tally: Tally) -> None:
    rng = random.Random(seed)
    refused = 0  # refusals in a row
    while time.monotonic() < end:
        status = await one_stream(client, rng, args, tally)
        refused = refused + 1 if status in RETRY_LATER else 0
        if refused and args.backoff > 0:
            pause = min(args.backoff * 2 ** (refused - 1), args.backoff_max) * rng.uniform(0.5, 1.5)
            await asyncio.sleep(min(pause, max(end - time.monotonic(), 0.0)))


async def worker_ids(client: AsyncClient) -> list[str]:
    """The registry's worker ids (role-host-pid-random): a restarted worker comes back under another id."""
    status = await client.stub.GetStatus(gateway_pb2.GetStatusRequest(), timeout=30)
    return sorted(w.worker_id for w in status.workers)


def percentiles(values: list[float]) -> dict[str, float | None]:
    if not values:
        return {f"p{q}": None for q in (50, 90, 99)} | {"max": None, "count": 0}
    a = np.asarray(values)
    return {f"p{q}": round(float(np.percentile(a, q)), 2) for q in (50, 90, 99)} | {
        "max": round(float(a.max()), 2),
        "count": len(values),
    }


async def soak(address: str, args) -> dict:
    tally = Tally()
    api_key = os.environ.get("KVRELAY_API_KEY") or None  # never a flag: `ps` shows flags to every user
    # Several channels, as many clients would open: one HTTP/2 connection for 1000 streams is not what a server sees.
    clients = [AsyncClient(address, api_key=api_key) for _ in range(args.channels)]
    try:
        ids_before = await worker_ids(clients[0])
        t0 = time.monotonic()
        end = t0 + args.duration
        loads = [os.getloadavg()[0]]
        tasks = [
            asyncio.create_task(client_loop(clients[i % len(clients)], args.seed * 100_003 + i, end, args, tally))
            for i in range(args.concurrency)
        ]
        last_tokens, last_t = 0, t0
        while not all(t.done() for t in tasks):
            await asyncio.wait(tasks, timeout=args.progress_every)
            now = time.monotonic()
            loads.append(os.getloadavg()[0])
            rate = (tally.all_tokens - last_tokens) / max(now - last_t, 1e-9)
            last_tokens, last_t = tally.all_tokens, now
            phase = "load" if now < end else "drain"
            print(
                f"[{now - t0:6.0f} s {phase}] in flight {tally.in_flight:5d}  {rate:7.1f} tok/s  load avg "
                f"{loads[-1]:.2f}  {dict(tally.outcomes.most_common())}",
                flush=True,
            )
        for t in tasks:
            t.result()  # a bug in the loop itself must not pass silently
        elapsed = time.monotonic() - t0
        ids_after = await worker_ids(clients[0])
    finally:
        for c in clients:
            await c.close()
    return {
        "elapsed_s": round(elapsed, 1),
        "outcomes": dict(tally.outcomes.most_common()),
        "requests": sum(tally.outcomes.values()),
        "samples": tally.samples,
        "max_in_flight": tally.max_in_flight,
        "tokens_ok": tally.ok_tokens,
        "tokens_all": tally.all_tokens,
        "tokens_per_s": round(tally.all_tokens / elapsed, 1),
        "ok_per_s": round(tally.outcomes["OK"] / elapsed, 2),
        "ttft_ms": percentiles(tally.ttft_ms),
        "itl_ms": percentiles(tally.itl_ms),
        "e2e_ms": percentiles(tally.e2e_ms),
        "load_avg_1m": {"start": loads[0], "max": max(loads), "end": loads[-1]},
        "worker_ids_before": ids_before,
        "worker_ids_after": ids_after,
    }


def audit_by_name(redis_url: str, name: str, timeout_s: float) -> tuple:
    """Deployment.audit() for a deployment this process did not start (--address with --name)."""
    from kvstore.sessions import SessionStore

    async def poll():
        async with SessionStore(redis_url, name) as store:
            deadline = time.monotonic() + timeout_s
            while True:
                report, stats = await store.audit(), await store.stats()
                if (report.ok and stats.used == 0) or time.monotonic() > deadline:
                    return report, stats
                await asyncio.sleep(0.2)

    return asyncio.run(poll())


def log_summary(text: str) -> dict:
    """What the deployment's log says about the soak: tracebacks (none expected: every failure is a status) and its
    warning lines, a sample of each kind with timestamps, ids and numbers blanked out."""
    kinds: Counter = Counter()
    lines = text.splitlines()
    for line in lines:
        if " WARNING " in line or line.startswith("kvrelay: "):
            kinds[re.sub(r"[0-9a-f]{6,}|\d+(\.\d+)?", "#", line)[:200]] += 1
    return {"tracebacks": text.count("Traceback"), "lines": len(lines), "notices": dict(kinds.most_common(20))}


def leftovers(deployment: Deployment) -> list[str]:
    """What the stopped deployment left: processes, /dev/shm regions (Deployment.leftovers), its log, Redis keys."""
    import redis

    out = deployment.leftovers() + ([str(deployment.log)] if deployment.log.exists() else [])
    client = redis.Redis.from_url(REDIS_URL)
    try:
        out += [f"redis:{k.decode()}" for k in client.scan_iter(match=f"{deployment.name}:*", count=1000)]
    finally:
        client.close()
    return out


def machine() -> dict:
    gpu = None
    if shutil.which("nvidia-smi"):
        out = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True).stdout.strip()
        gpu = out or None
    cpu = next((line.split(":", 1)[1].strip() for line in _cpuinfo() if line.startswith("model name")), "")
    return {
        "cpu_count": os.cpu_count(),
        "cpu": cpu,
        "gpu": gpu,
        "platform": platform.platform(),
        "python": platform.python_version(),
    }


def _cpuinfo() -> list[str]:
    try:
        return Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        return []


def commit() -> str:
    out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=ROOT)
    dirty = subprocess.run(
        ["git", "status", "--porcelain", "--untracked-files=no"], capture_output=True, text=True, cwd=ROOT
    )
    return out.stdout.strip() + ("+dirty" if dirty.stdout.strip() else "")


def results_path() -> Path:
    """soak_<date>.json; a second run that day gets soak_<date>b.json, and so on."""
    stem = f"soak_{date.today().isoformat()}"
    for suffix in ["", *"bcdefghijklmnopqrstuvwxyz"]:
        path = RESULTS / f"{stem}{suffix}.json"
        if not path.exists():
            return path
    raise RuntimeError(f"too many soak results for {stem}")


def verdict(result: dict) -> list[str]:
    """Why the soak failed (empty: it passed)."""
    out = result["outcomes"]
    why = [f"{n} {s}" for s, n in out.items() if s in FORBIDDEN or s in ("OK_WITHOUT_FINISH", "TOKENS_LOST")]
    if result["deployment_log"] and result["deployment_log"]["tracebacks"]:
        why.append(f"{result['deployment_log']['tracebacks']} tracebacks in the deployment's log")
    if result["deployment"] and result["deployment"]["left_behind"]:
        why.append(f"left behind: {result['deployment']['left_behind'][:5]}")
    if result["deployment"] and result["deployment"]["exit"] != 0:
        why.append(f"kvrelay up exited with {result['deployment']['exit']}")
    if result["restarted"]:
        why.append("a process restarted")
    if result["audit"] is not None and not result["audit"]["ok"]:
        why.append(f"audit: {result['audit']['message']}")
    return why


def report(result: dict) -> None:
    print(f"\nsoak: {result['concurrency']} streams for {result['duration_s']} s (+ drain), {result['elapsed_s']} s")
    print(f"requests: {result['requests']} (max {result['max_in_flight']} in flight)")
    for status, n in result["outcomes"].items():
        print(f"  {status:<22} {n:7d}  {100 * n / max(result['requests'], 1):5.1f}%")
        for sample in result["samples"].get(status, []):
            print(f"      e.g. {sample[:160]!r}")
    print(f"tokens: {result['tokens_all']} ({result['tokens_per_s']} tok/s); OK requests {result['ok_per_s']}/s")
    for name in ("ttft_ms", "itl_ms", "e2e_ms"):
        p = result[name]
        print(f"{name[:-3].upper():<5} (OK streams) p50 {p['p50']}  p90 {p['p90']}  p99 {p['p99']}  max {p['max']} ms")
    print(f"restarted: {result['restarted']}")
    if result["deployment"] is not None:
        d = result["deployment"]
        print(f"deployment {d['name']}: stopped with exit {d['exit']}, left behind: {d['left_behind'] or 'nothing'}")
    if result["deployment_log"] is not None:
        log = result["deployment_log"]
        print(f"deployment log: {log['lines']} lines, {log['tracebacks']} tracebacks")
        for line, n in log["notices"].items():
            print(f"  {n:6d} x {line[:150]}")
    audit = result["audit"]
    print("audit: " + ("skipped (no --name)" if audit is None else f"{audit['message']} {audit['stats']}"))
    target = set(result["outcomes"]) <= {"OK", "RESOURCE_EXHAUSTED"}
    print(f"target (every request OK or RESOURCE_EXHAUSTED): {'met' if target else 'not met'}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.soak", description=__doc__.splitlines()[0])
    parser.add_argument("--concurrency", type=int, default=1000, help="streams open at once (closed loop)")
    parser.add_argument("--duration", type=float, default=180.0, help="seconds new streams are started")
    parser.add_argument("--max-tokens", type=int, default=16, help="each request asks for 1..this many tokens")
    parser.add_argument("--timeout", type=float, default=120.0, help="each call's deadline, seconds")
    parser.add_argument("--backoff", type=float, default=0.5, help="pause after a refusal, seconds (0: none)")
    parser.add_argument("--backoff-max", type=float, default=8.0, help="longest pause after refusals in a row")
    parser.add_argument("--channels", type=int, default=8, help="gRPC connections the streams are spread over")
    parser.add_argument("--progress-every", type=float, default=10.0, help="seconds between progress lines")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--prefill-replicas", type=int, default=1, help="of the deployment the soak starts")
    parser.add_argument("--decode-replicas", type=int, default=1, help="of the deployment the soak starts")
    parser.add_argument(
        "--up-flags",
        default="",
        help='more flags of the started `kvrelay up`, one string split as a shell would (e.g. "--slo-ttft-ms 20000 '
        '--slo-itl-ms 2000": SLO admission, off on the CPU by default; a single flag needs the = form: '
        "--up-flags=--flag)",
    )
    parser.add_argument("--address", help="soak this running gateway instead of starting a deployment")
    parser.add_argument("--name", help="with --address: the deployment's name (its Redis prefix), for the audit")
    parser.add_argument("--redis-url", default=REDIS_URL, help="with --address and --name: its Redis")
    parser.add_argument("--log", help="keep the started deployment's log in this file (it is removed otherwise)")
    parser.add_argument("--no-write", action="store_true", help="print only, no JSON under bench/results/")
    args = parser.parse_args(argv)
    up_flags = shlex.split(args.up_flags)
    if up_flags and args.address is not None:
        parser.error("--up-flags is for the deployment the soak starts, not with --address")

    deployment, code, left = None, None, []
    if args.address is None:
        print("starting a deployment of the default model on the CPU ...", flush=True)
        deployment = Deployment(
            *up_flags,
            env={"KVRELAY_DEVICE": "cpu"},
            prefill_replicas=args.prefill_replicas,
            decode_replicas=args.decode_replicas,
        )
    address = args.address or deployment.address
    try:
        pids_before = {p.pid: p.role for p in deployment.processes()} if deployment else None
        result = asyncio.run(soak(address, args))
        pids_after = {p.pid: p.role for p in deployment.processes()} if deployment else None
        if deployment is not None:
            report_, stats = deployment.audit(timeout_s=60)
        elif args.name:
            report_, stats = audit_by_name(args.redis_url, args.name, timeout_s=60)
        else:
            report_ = stats = None
    finally:
        if deployment is not None:
            code = deployment.stop()
            left = leftovers(deployment)
            if code != 0 or left:
                print(f"deployment stop: exit {code}, left behind: {left}", file=sys.stderr)
            if args.log:
                Path(args.log).write_text(deployment.output())
    result |= {
        "command": shlex.join(["python", "-m", "bench.soak", *(argv if argv is not None else sys.argv[1:])]),
        "date": date.today().isoformat(),
        "commit": commit(),
        "machine": machine(),
        "address": args.address
        or f"started by the soak (kvrelay up, default model, CPU, {args.prefill_replicas} prefill and "
        f"{args.decode_replicas} decode replicas{', ' + shlex.join(up_flags) if up_flags else ''})",
        "concurrency": args.concurrency,
        "duration_s": args.duration,
        "max_tokens": args.max_tokens,
        "timeout_s": args.timeout,
        "backoff_s": args.backoff,
        "backoff_max_s": args.backoff_max,
        "channels": args.channels,
        "up_flags": up_flags,
        "seed": args.seed,
        "pids_before": pids_before,
        "pids_after": pids_after,
        "deployment": None if deployment is None else {"name": deployment.name, "exit": code, "left_behind": left},
        "deployment_log": log_summary(deployment.output()) if deployment else None,
        "restarted": (pids_before != pids_after) or result["worker_ids_before"] != result["worker_ids_after"],
        "audit": None
        if report_ is None
        else {"ok": report_.ok and stats.used == 0, "message": report_.message, "stats": stats.__dict__},
    }
    report(result)
    if not args.no_write:
        import json

        path = results_path()
        RESULTS.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(result, indent=2) + "\n")
        print(f"wrote {path.relative_to(ROOT)}")
    failed = verdict(result)
    if failed:
        print("FAILED: " + "; ".join(failed), file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())

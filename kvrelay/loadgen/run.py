"""`kvrelay bench serve`: a load generator against a running gateway, measured from the client's side.

    python -m kvrelay.loadgen.run --address 127.0.0.1:50051 --rate 4 --prompt-len 2048:8192 --output-len 256 \
        --warmup 10 --duration 60 --slo-ttft-ms 2000 --slo-itl-ms 50 --label disaggregated

Arrivals are open-loop Poisson (`--rate`: requests are sent on schedule whether or not earlier ones finished, which
is what users do and what exposes queueing) or closed-loop (`--concurrency N`: N clients, each sends its next request
when its previous one ended). Requests sent before `--warmup` seconds are run but left out of the numbers; arrivals
stop `--warmup + --duration` seconds after the start, and the requests still open then get `--drain-timeout` more
seconds. That moment is every call's gRPC deadline: a request still running then ends DEADLINE_EXCEEDED (and counts
as an error), and the gateway sees the deadline and aborts its work. So a run ends by itself after warm-up + duration
+ drain timeout (plus CANCEL_GRACE_S at worst), and it only ever calls `--address`.

Everything random is a function of `--seed`: the arrival times, and request i's lengths and prompt (each request has
its own generator seeded with (seed, i)), so two runs against two deployments send the same requests.
The definitions of the numbers are in kvrelay/loadgen/report.py.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import os
import re
import sys
import time
import uuid
from dataclasses import asdict, dataclass, field
from pathlib import Path

import grpc
import numpy as np
from tqdm import tqdm

from kvrelay.client import AsyncClient, build_request
from kvrelay.errors import UsageError
from kvrelay.loadgen.args import add_bench_serve_args
from kvrelay.loadgen.report import (
    RequestRecord,
    ServerFinish,
    Slo,
    Summary,
    format_table,
    spread_token_times,
    summarize,
    write_json,
    write_plots,
)
from kvrelay.v1 import common_pb2, gateway_pb2

# Separate random streams for the arrival times and the requests, so that changing --prompt-len does not move the
# arrivals (and the same seed gives the same request count whatever the lengths).
ARRIVAL_STREAM = 1
REQUEST_STREAM = 2
# After the drain deadline the gateway must end the calls itself (DEADLINE_EXCEEDED); this is how long we wait for
# that before cancelling them locally.
CANCEL_GRACE_S = 5.0
LABEL = re.compile(r"^[A-Za-z0-9._-]{1,64}$")


@dataclass(frozen=True)
class LengthRange:
    """A token count: fixed ("2048") or drawn uniformly from an inclusive range ("2048:8192")."""

    low: int
    high: int

    @staticmethod
    def parse(text: str, flag: str) -> LengthRange:
        parts = text.split(":")
        try:
            low, high = (int(parts[0]), int(parts[0])) if len(parts) == 1 else (int(parts[0]), int(parts[1]))
        except (ValueError, IndexError):
            raise UsageError(f"{flag} must be N or LOW:HIGH (token counts), got {text!r}") from None
        if len(parts) > 2 or low < 1 or high < low:
            raise UsageError(f"{flag} must be N or LOW:HIGH with 1 <= LOW <= HIGH, got {text!r}")
        return LengthRange(low, high)

    def draw(self, rng: np.random.Generator) -> int:
        return self.low if self.low == self.high else int(rng.integers(self.low, self.high + 1))

    def __str__(self) -> str:
        return str(self.low) if self.low == self.high else f"{self.low}:{self.high}"


@dataclass(frozen=True)
class ServeConfig:
    address: str
    rate: float | None  # open loop, requests/s; exactly one of rate and concurrency is set
    concurrency: int | None  # closed loop
    prompt_len: LengthRange
    output_len: LengthRange  # also the default for dataset lines without "output_len"
    dataset: str | None
    warmup_s: float
    duration_s: float
    drain_timeout_s: float
    seed: int
    slo: Slo
    label: str
    out_dir: str
    progress: bool = True
    plots: bool = True

    @property
    def arrivals_end_s(self) -> float:
        return self.warmup_s + self.duration_s

    def describe(self) -> str:
        load = (
            f"poisson {self.rate:g} req/s" if self.rate is not None else f"closed loop, concurrency {self.concurrency}"
        )
        lengths = f"dataset {self.dataset}" if self.dataset else f"prompt {self.prompt_len}"
        return (
            f"kvrelay bench serve [{self.label}] {self.address}: {load}, {lengths}, output {self.output_len}, "
            f"{self.duration_s:g} s (+{self.warmup_s:g} s warm-up), seed {self.seed}"
        )

    def to_json(self) -> dict:
        config = asdict(self)
        config["prompt_len"] = str(self.prompt_len)
        config["output_len"] = str(self.output_len)
        return config


@dataclass(frozen=True)
class DatasetEntry:
    """One line of a --dataset file: exactly one of the three prompt forms, and optionally its output length."""

    prompt: str = ""
    messages: tuple[dict, ...] = ()
    prompt_token_ids: tuple[int, ...] = ()
    output_len: int | None = None


@dataclass(frozen=True)
class RequestSpec:
    index: int
    output_len: int
    prompt: str = ""
    messages: tuple[dict, ...] = ()
    prompt_token_ids: tuple[int, ...] = ()

    @property
    def prompt_len(self) -> int | None:
        """Known only for token-id prompts (text goes through the gateway's tokenizer and chat template)."""
        return len(self.prompt_token_ids) if self.prompt_token_ids else None


def load_dataset(path: str) -> list[DatasetEntry]:
    """JSONL: each line {"messages": [{"role", "content"}, ...]} or {"prompt": "..."} or {"prompt_token_ids": [...]},
    with an optional "output_len". Blank lines are skipped."""
    entries = []
    try:
        lines = Path(path).read_text().splitlines()
    except OSError as exc:
        raise UsageError(f"cannot read --dataset {path}: {exc.strerror}") from exc
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        where = f"{path}:{number}"
        try:
            item = json.loads(line)
        except json.JSONDecodeError as exc:
            raise UsageError(f"{where}: not JSON ({exc.msg})") from exc
        if not isinstance(item, dict):
            raise UsageError(f"{where}: expected an object")
        forms = [key for key in ("messages", "prompt", "prompt_token_ids") if item.get(key)]
        if len(forms) != 1:
            raise UsageError(f"{where}: needs exactly one non-empty of messages, prompt, prompt_token_ids")
        output_len = item.get("output_len")
        if output_len is not None and (not isinstance(output_len, int) or output_len < 1):
            raise UsageError(f"{where}: output_len must be a positive integer")
        value = item[forms[0]]
        if forms[0] == "messages":
            if not isinstance(value, list) or not all(isinstance(m, dict) and "role" in m for m in value):
                raise UsageError(f"{where}: messages must be a list of {{role, content}} objects")
            messages = tuple({"role": str(m["role"]), "content": str(m.get("content", ""))} for m in value)
            entries.append(DatasetEntry(messages=messages, output_len=output_len))
        elif forms[0] == "prompt":
            entries.append(DatasetEntry(prompt=str(value), output_len=output_len))
        else:
            if not isinstance(value, list) or not all(isinstance(t, int) for t in value):
                raise UsageError(f"{where}: prompt_token_ids must be a list of integers")
            entries.append(DatasetEntry(prompt_token_ids=tuple(value), output_len=output_len))
    if not entries:
        raise UsageError(f"--dataset {path} has no requests")
    return entries


class Workload:
    """Request i's prompt and output length: a pure function of (seed, i), whatever order requests are sent in."""

    def __init__(self, config: ServeConfig, vocab_size: int, dataset: list[DatasetEntry] | None = None) -> None:
        self.config = config
        self.vocab_size = vocab_size
        self.dataset = dataset
        # Dataset lines are used in a seeded shuffled order, cycling when the run needs more requests than lines.
        self.order = np.random.default_rng([REQUEST_STREAM, config.seed]).permutation(len(dataset)) if dataset else None

    def spec(self, index: int) -> RequestSpec:
        rng = np.random.default_rng([REQUEST_STREAM, self.config.seed, index])
        output_len = self.config.output_len.draw(rng)
        if self.dataset is not None:
            entry = self.dataset[int(self.order[index % len(self.dataset)])]
            return RequestSpec(
                index=index,
                output_len=entry.output_len or output_len,
                prompt=entry.prompt,
                messages=entry.messages,
                prompt_token_ids=entry.prompt_token_ids,
            )
        prompt_len = self.config.prompt_len.draw(rng)
        ids = rng.integers(0, self.vocab_size, size=prompt_len, dtype=np.int64)
        return RequestSpec(index=index, output_len=output_len, prompt_token_ids=tuple(ids.tolist()))


def poisson_arrivals(rate: float, end_s: float, seed: int) -> list[float]:
    """Arrival times in [0, end_s) of a Poisson process of `rate` per second: exponential gaps of mean 1/rate."""
    rng = np.random.default_rng([ARRIVAL_STREAM, seed])
    times: list[float] = []
    t = 0.0
    while True:
        t += float(rng.exponential(1.0 / rate))
        if t >= end_s:
            return times
        times.append(t)


@dataclass
class _Trace:
    """A request while it runs (mutable on purpose: filled as messages arrive, frozen into a RequestRecord at the end,
    also when the request was cut off and never reached its own end)."""

    spec: RequestSpec
    scheduled_s: float
    warmup: bool
    start: float = 0.0  # perf_counter
    end: float | None = None
    messages: list[tuple[float, int]] = field(default_factory=list)  # (perf_counter at arrival, tokens in it)
    status: str = "DRAIN_TIMEOUT"  # replaced when the call ends by itself
    error: str = ""
    finish: gateway_pb2.Finish | None = None

    def record(self, t0: float, cut_off_at: float) -> RequestRecord:
        end = self.end if self.end is not None else cut_off_at
        token_times = spread_token_times(self.messages)
        finish = None
        if self.finish is not None:
            t = self.finish.timings
            finish = ServerFinish(
                reason=common_pb2.FinishReason.Name(self.finish.reason).removeprefix("FINISH_REASON_"),
                prompt_tokens=self.finish.prompt_tokens,
                completion_tokens=self.finish.completion_tokens,
                cached_prompt_tokens=self.finish.cached_prompt_tokens,
                request_id=self.finish.request_id,
                queue_ms=t.queue_ms,
                prefill_ms=t.prefill_ms,
                handoff_ms=t.handoff_ms,
                decode_ms=t.decode_ms,
                ttft_ms=t.ttft_ms,
                total_ms=t.total_ms,
            )
        prompt_len = self.spec.prompt_len
        if prompt_len is None and finish is not None:
            prompt_len = finish.prompt_tokens
        return RequestRecord(
            index=self.spec.index,
            warmup=self.warmup,
            scheduled_s=self.scheduled_s,
            start_s=self.start - t0,
            prompt_len=prompt_len,
            output_len=self.spec.output_len,
            status=self.status,
            error=self.error,
            ttft_ms=(self.messages[0][0] - self.start) * 1e3 if self.messages else None,
            e2e_ms=(end - self.start) * 1e3,
            token_times_ms=tuple((t - self.start) * 1e3 for t in token_times),
            finish=finish,
        )


@dataclass(frozen=True)
class ServeResult:
    config: ServeConfig
    model: dict  # GetModelInfo, as JSON
    records: list[RequestRecord]
    summary: Summary


class _Runner:
    """Sends requests and keeps their traces; shared by the open- and the closed-loop arrival processes."""

    def __init__(self, client: AsyncClient, workload: Workload, config: ServeConfig, bar: tqdm) -> None:
        self.client = client
        self.workload = workload
        self.config = config
        self.bar = bar
        self.traces: list[_Trace] = []
        self.in_flight = 0
        self.max_in_flight = 0
        self.t0 = time.perf_counter()
        self.deadline = self.t0 + config.arrivals_end_s + config.drain_timeout_s

    def now_s(self) -> float:
        return time.perf_counter() - self.t0

    async def request(self, index: int, scheduled_s: float) -> None:
        spec = self.workload.spec(index)
        trace = _Trace(spec=spec, scheduled_s=scheduled_s, warmup=scheduled_s < self.config.warmup_s)
        self.traces.append(trace)
        request = build_request(
            prompt=spec.prompt or None,
            messages=list(spec.messages) or None,
            prompt_token_ids=list(spec.prompt_token_ids) or None,
            max_tokens=spec.output_len,
            ignore_eos=True,  # exact output lengths
            request_id=f"bench-{self.config.label}-{index}-{uuid.uuid4().hex[:8]}",
        )
        self.in_flight += 1
        self.max_in_flight = max(self.max_in_flight, self.in_flight)
        trace.start = time.perf_counter()
        # The drain deadline is every call's deadline: the gateway aborts what is still running then.
        call = self.client.stub.Generate(request, timeout=max(self.deadline - trace.start, 0.001))
        try:
            async for message in call:
                trace.messages.append((time.perf_counter(), len(message.token_ids)))
                if message.HasField("finish"):
                    trace.finish = message.finish
            trace.status = "OK"
        except grpc.aio.AioRpcError as exc:
            trace.status = exc.code().name
            trace.error = exc.details() or ""
        except Exception as exc:  # a bug of ours must not pass for a server's status, nor stop the other requests
            trace.status = "CLIENT_ERROR"
            trace.error = repr(exc)
        finally:
            # A no-op on an ended call; one this task leaves early (cancelled, see finish) ends at once, not when a
            # garbage collection happens to find it.
            call.cancel()
            if trace.status != "DRAIN_TIMEOUT":  # cancelled locally (see finish): the end is the cut-off time
                trace.end = time.perf_counter()
            self.in_flight -= 1
            self.bar.update(1)

    async def finish(self, tasks: list[asyncio.Task]) -> None:
        """Wait for the open requests until the drain deadline (+ the gateway's grace), then cancel what is left."""
        if not tasks:
            return
        timeout = max(self.deadline - time.perf_counter(), 0.0) + CANCEL_GRACE_S
        _, pending = await asyncio.wait(tasks, timeout=timeout)
        for task in pending:
            task.cancel()
        if pending:
            await asyncio.gather(*pending, return_exceptions=True)


async def _open_loop(runner: _Runner, arrivals: list[float]) -> None:
    tasks = []
    for index, at in enumerate(arrivals):
        delay = runner.t0 + at - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        tasks.append(asyncio.create_task(runner.request(index, at)))
    await runner.finish(tasks)


async def _closed_loop(runner: _Runner, concurrency: int) -> None:
    counter = itertools.count()

    async def client_loop() -> None:
        while (now := runner.now_s()) < runner.config.arrivals_end_s:
            await runner.request(next(counter), now)

    await runner.finish([asyncio.create_task(client_loop()) for _ in range(concurrency)])


async def run_serve(config: ServeConfig) -> ServeResult:
    dataset = load_dataset(config.dataset) if config.dataset else None
    # a gateway with API keys: the key comes from KVRELAY_API_KEY (never a flag: `ps` shows flags to every user)
    async with AsyncClient(config.address, api_key=os.environ.get("KVRELAY_API_KEY") or None) as client:
        try:
            info = await client.stub.GetModelInfo(gateway_pb2.GetModelInfoRequest(), timeout=30)
        except grpc.aio.AioRpcError as exc:
            raise UsageError(f"GetModelInfo at {config.address} failed: {exc.code().name}: {exc.details()}") from exc
        longest = config.prompt_len.high + config.output_len.high
        if dataset is None and info.max_model_len and longest > info.max_model_len:
            raise UsageError(
                f"--prompt-len {config.prompt_len} + --output-len {config.output_len} can reach {longest} tokens, "
                f"over the model's max_model_len {info.max_model_len}"
            )
        workload = Workload(config, info.vocab_size, dataset)
        arrivals = poisson_arrivals(config.rate, config.arrivals_end_s, config.seed) if config.rate else None
        with tqdm(
            total=len(arrivals) if arrivals is not None else None,
            desc=f"bench serve [{config.label}]",
            unit="req",
            disable=not config.progress,
        ) as bar:
            runner = _Runner(client, workload, config, bar)
            if arrivals is not None:
                await _open_loop(runner, arrivals)
            else:
                await _closed_loop(runner, config.concurrency)
    cut_off_at = time.perf_counter()
    records = sorted((t.record(runner.t0, cut_off_at) for t in runner.traces), key=lambda r: r.index)
    summary = summarize(records, config.warmup_s, config.slo, runner.max_in_flight)
    model = {
        "name": info.name,
        "architecture": info.architecture,
        "dtype": info.dtype,
        "kv_dtype": info.kv_dtype,
        "block_size": info.block_size,
        "max_model_len": info.max_model_len,
        "vocab_size": info.vocab_size,
    }
    return ServeResult(config=config, model=model, records=records, summary=summary)


def config_from_args(args: argparse.Namespace) -> ServeConfig:
    if args.rate is not None and not args.rate > 0:
        raise UsageError(f"--rate must be > 0, got {args.rate}")
    if args.concurrency is not None and args.concurrency < 1:
        raise UsageError(f"--concurrency must be >= 1, got {args.concurrency}")
    if not args.duration > 0:
        raise UsageError(f"--duration must be > 0, got {args.duration}")
    for flag, value in (("--warmup", args.warmup), ("--drain-timeout", args.drain_timeout)):
        if not value >= 0:
            raise UsageError(f"{flag} must be >= 0, got {value}")
    for flag, value in (("--slo-ttft-ms", args.slo_ttft_ms), ("--slo-itl-ms", args.slo_itl_ms)):
        if value is not None and not value > 0:
            raise UsageError(f"{flag} must be > 0, got {value}")
    if not LABEL.match(args.label):
        raise UsageError(f"--label must be 1-64 of [A-Za-z0-9._-] (it names files), got {args.label!r}")
    return ServeConfig(
        address=args.address,
        rate=args.rate,
        concurrency=args.concurrency,
        prompt_len=LengthRange.parse(args.prompt_len, "--prompt-len"),
        output_len=LengthRange.parse(args.output_len, "--output-len"),
        dataset=args.dataset,
        warmup_s=args.warmup,
        duration_s=args.duration,
        drain_timeout_s=args.drain_timeout,
        seed=args.seed,
        slo=Slo(ttft_ms=args.slo_ttft_ms, itl_ms=args.slo_itl_ms),
        label=args.label,
        out_dir=args.out,
        progress=not args.no_progress,
        plots=not args.no_plots,
    )


def bench_serve_command(args: argparse.Namespace) -> int:
    """Run the load, print the table, write serve_<label>.json (and PNGs). 1 if no measured request ended OK."""
    config = config_from_args(args)
    print(config.describe(), file=sys.stderr)
    result = asyncio.run(run_serve(config))
    print(format_table(result.summary, config.describe(), config.slo))
    out = Path(config.out_dir)
    json_path = write_json(
        out / f"serve_{config.label}.json",
        {**config.to_json(), "model": result.model},
        result.summary,
        result.records,
    )
    print(f"wrote {json_path}")
    if config.plots:
        try:
            paths = write_plots(out, config.label, result.records, config.warmup_s, config.slo)
        except ImportError:
            print("matplotlib is not installed: no plots (pip install matplotlib)", file=sys.stderr)
        else:
            for path in paths:
                print(f"wrote {path}")
    if result.summary.num_ok == 0:
        print("no measured request ended OK", file=sys.stderr)
        return 1
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m kvrelay.loadgen.run", description=__doc__.splitlines()[0])
    add_bench_serve_args(parser)
    args = parser.parse_args(argv)
    try:
        return bench_serve_command(args)
    except UsageError as exc:
        print(f"kvrelay bench serve: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())

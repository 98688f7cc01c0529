"""What `kvrelay bench serve` measured, judged: per-request records, the summary, the table, the JSON and the plots.

kvrelay/loadgen/run.py produces the load and the records; this file only reads them. Definitions used everywhere:

- TTFT: request sent -> first streamed message received by the client (the gateway's first message carries the
  first token).
- Token arrival times: a message carrying k tokens is spread evenly over the time since the previous token arrived,
  so a gateway that coalesces tokens shows k equal gaps instead of one large gap and k-1 zeros. The first message's
  tokens all count at its arrival: there is no earlier token to spread from.
- ITL: the gap between two consecutive token arrivals of one request. The ITL percentiles pool every gap of every
  measured OK request.
- E2E: request sent -> the stream's status received.
- Measured requests: those sent at or after the warm-up's end. Latency percentiles use the ones that ended OK.
- Elapsed: warm-up end -> the last measured request ended. Both throughputs and goodput divide by it.
- Prefill running: from a request's first forward pass in the prefill worker to its reply, placed on the client's
  clock by the first token's arrival minus the server's hand-off and prefill times (Finish.timings); a request
  without a Finish counts from sent to first token. ITL is also reported split by whether any prefill was running
  during the gap: the same run, batch and contexts, with and without prefill traffic: what a long prompt does to
  everyone else's tokens.
- Goodput: measured requests that ended OK with TTFT <= slo_ttft_ms AND mean ITL <= slo_itl_ms, per second.
  The per-token SLO is judged on the request's mean ITL ((last - first token) / (tokens - 1)), DistServe's TPOT: the
  rate a reader of that stream perceives. One long stall (another request's prefill) barely moves a mean; stalls show
  in the pooled ITL p99 and in the ITL-over-time plot. A request with one token has no gap and meets the ITL SLO.
  An unset SLO constrains nothing.
"""

from __future__ import annotations

import bisect
import json
from collections import Counter
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

PERCENTILES = (50, 90, 99)
TIMING_FIELDS = ("queue_ms", "prefill_ms", "handoff_ms", "decode_ms", "ttft_ms", "total_ms")
SCHEMA = "kvrelay.bench.serve/1"


@dataclass(frozen=True)
class ServerFinish:
    """The Finish record the gateway sent in its last message (its timings are the gateway's clock, not ours)."""

    reason: str  # "STOP", "LENGTH", ... (FinishReason without its prefix)
    prompt_tokens: int
    completion_tokens: int
    cached_prompt_tokens: int
    request_id: str
    queue_ms: float
    prefill_ms: float
    handoff_ms: float
    decode_ms: float
    ttft_ms: float
    total_ms: float


@dataclass(frozen=True)
class RequestRecord:
    """One request as the client saw it. Times in seconds are since the benchmark started (the first arrival slot)."""

    index: int
    warmup: bool
    scheduled_s: float  # when the arrival process asked for it (closed loop: when a worker became free)
    start_s: float  # when it was sent; start_s - scheduled_s is the generator's own lag
    prompt_len: int | None  # known for token-id prompts; otherwise Finish.prompt_tokens; None if neither
    output_len: int  # max_tokens asked (with ignore_eos, the length an OK request returns)
    status: str  # "OK", a grpc.StatusCode name, or "DRAIN_TIMEOUT" (cut off locally), "CLIENT_ERROR"
    error: str  # the status details; empty when OK
    ttft_ms: float | None  # None when no message arrived
    e2e_ms: float
    token_times_ms: tuple[float, ...]  # each token's arrival, ms since start_s (spread as the module docstring says)
    finish: ServerFinish | None

    @property
    def ok(self) -> bool:
        return self.status == "OK"

    @property
    def output_tokens(self) -> int:
        return len(self.token_times_ms)

    @property
    def end_s(self) -> float:
        return self.start_s + self.e2e_ms / 1e3

    @property
    def itls_ms(self) -> list[float]:
        t = self.token_times_ms
        return [b - a for a, b in zip(t, t[1:], strict=False)]

    @property
    def mean_itl_ms(self) -> float | None:
        t = self.token_times_ms
        return (t[-1] - t[0]) / (len(t) - 1) if len(t) >= 2 else None

    def to_json(self) -> dict:
        record = asdict(self)
        record["output_tokens"] = self.output_tokens
        record["mean_itl_ms"] = self.mean_itl_ms
        record["token_times_ms"] = [round(t, 3) for t in self.token_times_ms]  # microseconds are plenty
        return record

    @classmethod
    def from_json(cls, record: dict) -> RequestRecord:
        """A record read back from to_json's output (the derived fields it adds are dropped)."""
        fields = {k: v for k, v in record.items() if k not in ("output_tokens", "mean_itl_ms")}
        fields["token_times_ms"] = tuple(fields["token_times_ms"])
        fields["finish"] = ServerFinish(**fields["finish"]) if fields["finish"] else None
        return cls(**fields)


def spread_token_times(messages: Sequence[tuple[float, int]]) -> list[float]:
    """Token arrival times from (message arrival time, tokens in the message) pairs, in arrival order."""
    times: list[float] = []
    for arrived, count in messages:
        if count <= 0:
            continue
        if not times:
            times.extend([arrived] * count)
            continue
        previous = times[-1]
        times.extend(previous + (arrived - previous) * (j + 1) / count for j in range(count))
    return times


@dataclass(frozen=True)
class Slo:
    """Service-level objectives of goodput; None = unconstrained."""

    ttft_ms: float | None = None
    itl_ms: float | None = None  # judged on each request's mean ITL (module docstring says why)

    def met_by(self, record: RequestRecord) -> bool:
        if not record.ok or record.ttft_ms is None:
            return False
        if self.ttft_ms is not None and record.ttft_ms > self.ttft_ms:
            return False
        mean_itl = record.mean_itl_ms
        return self.itl_ms is None or mean_itl is None or mean_itl <= self.itl_ms

    def describe(self) -> str:
        parts = [f"TTFT <= {self.ttft_ms:g} ms" if self.ttft_ms is not None else "TTFT unconstrained"]
        parts.append(f"mean ITL <= {self.itl_ms:g} ms" if self.itl_ms is not None else "ITL unconstrained")
        return " and ".join(parts)


@dataclass(frozen=True)
class LatencyStats:
    count: int
    mean: float | None
    p50: float | None
    p90: float | None
    p99: float | None

    @staticmethod
    def of(values: Sequence[float]) -> LatencyStats:
        if not values:
            return LatencyStats(0, None, None, None, None)
        p50, p90, p99 = (float(v) for v in np.percentile(np.asarray(values, dtype=np.float64), PERCENTILES))
        return LatencyStats(len(values), float(np.mean(values)), p50, p90, p99)


@dataclass(frozen=True)
class Goodput:
    slo_ttft_ms: float | None
    slo_itl_ms: float | None
    num_good: int
    fraction: float  # num_good / measured requests (failed requests count as missing the SLO)
    requests_per_s: float


@dataclass(frozen=True)
class Summary:
    num_requests: int  # measured (sent after the warm-up)
    num_warmup: int
    num_ok: int
    errors: dict[str, int]  # status name -> count, measured requests only
    elapsed_s: float
    request_throughput: float  # OK requests / elapsed
    output_token_throughput: float  # tokens received by measured requests (failed ones included) / elapsed
    max_in_flight: int  # most requests open at once, warm-up included
    ttft_ms: LatencyStats
    itl_ms: LatencyStats
    itl_ms_prefill_running: LatencyStats  # the gaps during which some prefill was running
    itl_ms_no_prefill: LatencyStats  # the others
    e2e_ms: LatencyStats
    goodput: Goodput
    server_ms: dict[str, LatencyStats]  # Finish.timings of the measured OK requests, by field


def summarize(records: Sequence[RequestRecord], warmup_s: float, slo: Slo, max_in_flight: int) -> Summary:
    measured = [r for r in records if not r.warmup]
    ok = [r for r in measured if r.ok]
    errors = dict(sorted(Counter(r.status for r in measured if not r.ok).items()))
    elapsed = max((r.end_s for r in measured), default=warmup_s) - warmup_s
    per_s = 1.0 / elapsed if elapsed > 0 else 0.0
    good = sum(slo.met_by(r) for r in measured)
    finishes = [r.finish for r in ok if r.finish is not None]
    during, outside = itl_by_prefill(records)
    return Summary(
        num_requests=len(measured),
        num_warmup=len(records) - len(measured),
        num_ok=len(ok),
        errors=errors,
        elapsed_s=elapsed,
        request_throughput=len(ok) * per_s,
        output_token_throughput=sum(r.output_tokens for r in measured) * per_s,
        max_in_flight=max_in_flight,
        ttft_ms=LatencyStats.of([r.ttft_ms for r in ok if r.ttft_ms is not None]),
        itl_ms=LatencyStats.of([gap for r in ok for gap in r.itls_ms]),
        itl_ms_prefill_running=LatencyStats.of(during),
        itl_ms_no_prefill=LatencyStats.of(outside),
        e2e_ms=LatencyStats.of([r.e2e_ms for r in ok]),
        goodput=Goodput(
            slo_ttft_ms=slo.ttft_ms,
            slo_itl_ms=slo.itl_ms,
            num_good=good,
            fraction=good / len(measured) if measured else 0.0,
            requests_per_s=good * per_s,
        ),
        server_ms={name: LatencyStats.of([getattr(f, name) for f in finishes]) for name in TIMING_FIELDS},
    )


def _ms(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f}"


def format_table(summary: Summary, title: str, slo: Slo) -> str:
    s = summary
    errors = ", ".join(f"{code} {n}" for code, n in s.errors.items()) or "none"
    lines = [
        title,
        f"requests: {s.num_requests} measured ({s.num_warmup} warm-up), {s.num_ok} OK; errors: {errors}",
        f"throughput: {s.request_throughput:.2f} req/s, {s.output_token_throughput:.1f} output tok/s "
        f"over {s.elapsed_s:.1f} s; max in flight {s.max_in_flight}",
        f"goodput ({slo.describe()}): {s.goodput.requests_per_s:.2f} req/s, "
        f"{s.goodput.num_good}/{s.num_requests} = {100 * s.goodput.fraction:.1f} % of requests",
        "",
        f"{'ms':<22}{'mean':>10}{'p50':>10}{'p90':>10}{'p99':>10}{'count':>9}",
    ]
    rows = [("TTFT", s.ttft_ms), ("ITL", s.itl_ms), ("ITL, prefill running", s.itl_ms_prefill_running),
            ("ITL, no prefill", s.itl_ms_no_prefill), ("E2E", s.e2e_ms)]  # fmt: skip
    rows += [(f"server {name.removesuffix('_ms')}", stats) for name, stats in s.server_ms.items()]
    for name, st in rows:
        lines.append(f"{name:<22}{_ms(st.mean):>10}{_ms(st.p50):>10}{_ms(st.p90):>10}{_ms(st.p99):>10}{st.count:>9}")
    return "\n".join(lines)


def write_json(path: Path, config: dict, summary: Summary, records: Sequence[RequestRecord]) -> Path:
    document = {
        "schema": SCHEMA,
        "config": config,
        "summary": asdict(summary),
        "requests": [r.to_json() for r in records],
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    # allow_nan=False: a NaN or inf would make the file unreadable to strict JSON parsers; the summary has None instead.
    path.write_text(json.dumps(document, indent=1, allow_nan=False) + "\n")
    return path


def merge_spans(spans: Sequence[tuple[float, float]]) -> list[tuple[float, float]]:
    """Union of [start, end] intervals, sorted: overlapping prefills drawn once, not as stacked translucent layers."""
    merged: list[tuple[float, float]] = []
    for start, end in sorted(spans):
        if merged and start <= merged[-1][1]:
            merged[-1] = (merged[-1][0], max(merged[-1][1], end))
        else:
            merged.append((start, end))
    return merged


def prefill_spans(records: Sequence[RequestRecord]) -> list[tuple[float, float]]:
    """When some prefill was running (seconds since the start, merged): each request's [first forward pass, reply],
    as the module docstring defines it; warm-up requests included, since their prefills run beside measured decodes."""
    spans = []
    for r in records:
        if r.ttft_ms is None:
            continue
        first_token = r.start_s + r.ttft_ms / 1e3
        if r.finish is not None and r.finish.prefill_ms > 0:
            reply = first_token - r.finish.handoff_ms / 1e3
            spans.append((reply - r.finish.prefill_ms / 1e3, reply))
        else:
            spans.append((r.start_s, first_token))
    return merge_spans(spans)


def itl_by_prefill(records: Sequence[RequestRecord]) -> tuple[list[float], list[float]]:
    """The gaps of the measured OK requests (ms), split: (those overlapping a prefill span, the others)."""
    spans = prefill_spans(records)
    starts = [start for start, _ in spans]
    during: list[float] = []
    outside: list[float] = []
    for r in records:
        if r.warmup or not r.ok:
            continue
        times = r.token_times_ms
        for a, b in zip(times, times[1:], strict=False):
            begin, end = r.start_s + a / 1e3, r.start_s + b / 1e3
            i = bisect.bisect_left(starts, end) - 1  # the last span starting before the gap ends
            (during if i >= 0 and spans[i][1] > begin else outside).append(b - a)
    return during, outside


def _log_axis(axis, set_scale) -> None:
    """Log scale labelled 1, 2, 5, 10, 20, ... ms (matplotlib's default labels short ranges as 3x10^0, 4x10^0...)."""
    from matplotlib import ticker

    set_scale("log")
    axis.set_major_locator(ticker.LogLocator(subs=(1.0, 2.0, 5.0)))
    axis.set_major_formatter(ticker.FuncFormatter(lambda value, _: f"{value:g}"))
    axis.set_minor_formatter(ticker.NullFormatter())


def write_plots(out_dir: Path, label: str, records: Sequence[RequestRecord], warmup_s: float, slo: Slo) -> list[Path]:
    """Latency CDFs (TTFT, ITL) and ITL over time with the prefill bursts marked; returns the PNG paths."""
    import matplotlib

    matplotlib.use("Agg")  # files only; never a window
    import matplotlib.pyplot as plt

    out_dir.mkdir(parents=True, exist_ok=True)
    ok = [r for r in records if r.ok and not r.warmup]
    cdf_path = out_dir / f"serve_{label}_cdf.png"
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    panels = [
        ("TTFT", [r.ttft_ms for r in ok if r.ttft_ms is not None], slo.ttft_ms),
        ("ITL", [gap for r in ok for gap in r.itls_ms], slo.itl_ms),
    ]
    for ax, (name, values, limit) in zip(axes, panels, strict=True):
        if values:
            x = np.sort(np.asarray(values))
            ax.plot(x, np.arange(1, len(x) + 1) / len(x), drawstyle="steps-post")
            if x[0] > 0:
                _log_axis(ax.xaxis, ax.set_xscale)  # a stall is 10-100x the typical gap; linear would hide the body
        if limit is not None:
            ax.axvline(limit, color="tab:red", linestyle="--", label=f"SLO {limit:g} ms")
            ax.legend(loc="lower right")
        ax.set_title(f"{name} CDF ({label}, {len(values)} samples)")
        ax.set_xlabel(f"{name} (ms)")
        ax.set_ylabel("fraction")
        ax.grid(True, alpha=0.3)
    fig.tight_layout()
    fig.savefig(cdf_path, dpi=120)
    plt.close(fig)

    time_path = out_dir / f"serve_{label}_itl_time.png"
    fig, ax = plt.subplots(figsize=(12, 4.5))
    xs: list[float] = []
    ys: list[float] = []
    for r in records:
        times = r.token_times_ms
        for a, b in zip(times, times[1:], strict=False):
            xs.append(r.start_s + b / 1e3)
            ys.append(b - a)
    prefills = prefill_spans(records)
    if prefills:
        ax.broken_barh(
            [(start, end - start) for start, end in prefills],
            (0, 1),
            transform=ax.get_xaxis_transform(),  # full height whatever the y range
            facecolor="tab:orange",
            alpha=0.2,
            label="a prefill running",
        )
    ax.scatter(xs, ys, s=2, color="tab:blue", label="token gap", rasterized=True)
    if ys and min(ys) > 0:
        _log_axis(ax.yaxis, ax.set_yscale)
    if warmup_s > 0:
        ax.axvline(warmup_s, color="black", linestyle=":", label="end of warm-up")
    if slo.itl_ms is not None:
        ax.axhline(slo.itl_ms, color="tab:red", linestyle="--", label=f"ITL SLO {slo.itl_ms:g} ms")
    ax.set_title(f"inter-token latency over time ({label})")
    ax.set_xlabel("time since start (s)")
    ax.set_ylabel("gap before the token (ms)")
    ax.grid(True, alpha=0.3)
    ax.legend(loc="upper right", fontsize="small")
    fig.tight_layout()
    fig.savefig(time_path, dpi=120)
    plt.close(fig)
    return [cdf_path, time_path]

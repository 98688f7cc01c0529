"""`kvrelay bench serve` measured against a fake gateway whose delays are known: 50 ms to the first token, 10 ms
between tokens, RESOURCE_EXHAUSTED for odd prompt lengths and INTERNAL after 3 tokens for lengths = 2 mod 4.

The fake runs on its own event loop in a thread, so the generator's loop (asyncio.run in bench_serve_command) only
measures. No deployment, no model, no Redis.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import socket
import statistics
import threading
import time
from collections import Counter

import grpc
import pytest

from kvrelay.errors import UsageError
from kvrelay.loadgen.report import (
    RequestRecord,
    ServerFinish,
    Slo,
    itl_by_prefill,
    merge_spans,
    prefill_spans,
    spread_token_times,
    summarize,
)
from kvrelay.loadgen.run import (
    LengthRange,
    add_bench_serve_args,
    bench_serve_command,
    config_from_args,
    load_dataset,
    poisson_arrivals,
    run_serve,
)
from kvrelay.rpc.grpc_server import set_serving, start_server
from kvrelay.v1 import common_pb2, gateway_pb2, gateway_pb2_grpc

SERVICE = gateway_pb2.DESCRIPTOR.services_by_name["Gateway"].full_name
T_FIRST_S = 0.050
T_GAP_S = 0.010
VOCAB = 1000
# What the fake "tokenizes" a conversation and a text prompt to (both even and 0 mod 4: they succeed).
MESSAGES_TOKENS = 12
PROMPT_TOKENS = 16


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class FakeGateway(gateway_pb2_grpc.GatewayServicer):
    """Known delays and known failures; remembers what it did per request index and its peak concurrency."""

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self.in_flight = 0
        self.max_in_flight = 0
        self.outcomes: dict[int, str] = {}  # request index (from request_id) -> status name

    async def GetModelInfo(self, request, context):
        return gateway_pb2.ModelInfo(name="fake", vocab_size=VOCAB, max_model_len=4096, block_size=16)

    async def Generate(self, request, context):
        index = int(request.request_id.split("-")[2])  # "bench-<label>-<index>-<random>"
        self.in_flight += 1
        self.max_in_flight = max(self.max_in_flight, self.in_flight)
        self.outcomes[index] = "CANCELLED"  # until it ends otherwise (the client's deadline or cancel)
        try:
            ids = list(request.prompt_token_ids)
            if any(not 0 <= t < VOCAB for t in ids) or not request.ignore_eos:
                self.outcomes[index] = "INVALID_ARGUMENT"
                await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "token id out of range or ignore_eos unset")
            prompt_tokens = len(ids) or (MESSAGES_TOKENS if request.messages else PROMPT_TOKENS)
            if prompt_tokens % 2 == 1:
                self.outcomes[index] = "RESOURCE_EXHAUSTED"
                await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, "queue full")
            # Token-id prompts get one token per message; text prompts get the first token alone, then pairs
            # every 2 gaps (a gateway coalescing tokens), which the client spreads back into 10 ms gaps.
            n = request.max_tokens
            chunks = [1] * n if ids else [1] + [2] * ((n - 1) // 2) + [1] * ((n - 1) % 2)
            sent = 0
            for k, size in enumerate(chunks):
                await asyncio.sleep(T_FIRST_S if k == 0 else T_GAP_S * size)
                if prompt_tokens % 4 == 2 and sent == 3:
                    self.outcomes[index] = "INTERNAL"
                    await context.abort(grpc.StatusCode.INTERNAL, "decode worker failed")
                message = gateway_pb2.GenerateResponse(token_ids=[(sent + j) % VOCAB for j in range(size)])
                sent += size
                if sent == n:
                    self.outcomes[index] = "OK"
                    message.finish.CopyFrom(
                        gateway_pb2.Finish(
                            reason=common_pb2.FINISH_REASON_LENGTH,
                            prompt_tokens=prompt_tokens,
                            completion_tokens=n,
                            request_id=request.request_id,
                            timings=common_pb2.Timings(handoff_ms=1.5, ttft_ms=T_FIRST_S * 1e3),
                        )
                    )
                yield message
        finally:
            self.in_flight -= 1


@pytest.fixture(scope="module")
def fake_gateway():
    """(address, servicer): the fake served from a thread of its own with its own event loop."""
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    servicer = FakeGateway()
    port = free_port()

    async def start():
        servicers = [(gateway_pb2_grpc.add_GatewayServicer_to_server, servicer)]
        server, health = await start_server(servicers, [SERVICE], port)
        await set_serving(health, [SERVICE], serving=True)
        return server

    server = asyncio.run_coroutine_threadsafe(start(), loop).result(10)
    try:
        yield f"127.0.0.1:{port}", servicer
    finally:
        asyncio.run_coroutine_threadsafe(server.stop(0), loop).result(10)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(10)
        loop.close()


def parse(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    add_bench_serve_args(parser)
    return parser.parse_args([*argv, "--no-progress"])


def expected_errors(measured: set[int], servicer: FakeGateway) -> dict[str, int]:
    """What the fake did to the measured requests, counted by status (the generator must report exactly this)."""
    return dict(sorted(Counter(c for i, c in servicer.outcomes.items() if i in measured and c != "OK").items()))


def test_open_loop_poisson_numbers_match_known_delays(fake_gateway, tmp_path):
    address, servicer = fake_gateway
    servicer.reset()
    rate, warmup, duration, seed = 40.0, 0.25, 1.5, 7
    args = parse(
        "--address", address, "--rate", str(rate), "--prompt-len", "8:15", "--output-len", "8",
        "--warmup", str(warmup), "--duration", str(duration), "--drain-timeout", "3", "--seed", str(seed),
        "--slo-ttft-ms", "5000", "--slo-itl-ms", "500", "--label", "colocated", "--out", str(tmp_path),
    )  # fmt: skip
    assert bench_serve_command(args) == 0

    document = json.loads((tmp_path / "serve_colocated.json").read_text())
    assert document["schema"] == "kvrelay.bench.serve/1"
    assert document["config"]["rate"] == rate and document["config"]["model"]["vocab_size"] == VOCAB
    for name in ("serve_colocated_cdf.png", "serve_colocated_itl_time.png"):
        assert (tmp_path / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    # Poisson arrivals: seeded, so the count is exact; and about rate * time.
    arrivals = poisson_arrivals(rate, warmup + duration, seed)
    requests = document["requests"]
    assert len(requests) == len(arrivals) == len(servicer.outcomes)
    summary = document["summary"]
    assert summary["num_requests"] == sum(at >= warmup for at in arrivals)
    assert summary["num_warmup"] == sum(at < warmup for at in arrivals)
    assert abs(summary["num_requests"] - rate * duration) < 3 * (rate * duration) ** 0.5
    # Requests leave on schedule (the generator is not the bottleneck at this rate; a loaded CPU adds spikes).
    assert statistics.median(r["start_s"] - r["scheduled_s"] for r in requests) < 0.25

    # Latencies: 50 ms to the first token, 10 ms between tokens, 8 tokens. The fake's sleeps are lower bounds; the
    # upper bounds are wide because this machine's CPU can be starved by its host (steal time), but still far from
    # what a mix-up would give (an ITL that counted the first token's 50 ms, an E2E without the token gaps).
    ttft, itl, e2e = (summary[k]["p50"] for k in ("ttft_ms", "itl_ms", "e2e_ms"))
    assert ttft >= 45, summary["ttft_ms"]
    assert 8 <= itl < ttft, summary["itl_ms"]  # a gap never includes the wait for the first token
    assert e2e >= ttft + 7 * 8, summary["e2e_ms"]
    for r in requests:  # per request, whatever the CPU does: first token = TTFT, the stream ends after the last token
        if r["status"] == "OK":
            assert r["token_times_ms"][0] == pytest.approx(r["ttft_ms"], abs=0.01)
            assert r["e2e_ms"] >= r["token_times_ms"][-1] >= r["ttft_ms"] + 7 * 8
    assert summary["server_ms"]["handoff_ms"]["p50"] == 1.5
    # The ITL split by prefill running: every gap lands on one side; at 40 req/s with 50 ms to the first token some
    # request is almost always waiting for its first token (the fake reports no prefill_ms: sent -> first token).
    split = (summary["itl_ms_prefill_running"], summary["itl_ms_no_prefill"])
    assert split[0]["count"] + split[1]["count"] == summary["itl_ms"]["count"] and split[0]["count"] > 0

    # Errors by code, exactly as the fake decided them; partial streams keep the tokens they received.
    measured = [r for r in requests if not r["warmup"]]
    assert summary["errors"] == expected_errors({r["index"] for r in measured}, servicer)
    assert set(summary["errors"]) == {"RESOURCE_EXHAUSTED", "INTERNAL"}
    for r in measured:
        assert r["prompt_len"] in range(8, 16)
        expected = {1: "RESOURCE_EXHAUSTED", 3: "RESOURCE_EXHAUSTED", 2: "INTERNAL", 0: "OK"}[r["prompt_len"] % 4]
        assert r["status"] == expected == servicer.outcomes[r["index"]]
        assert r["output_tokens"] == {"OK": 8, "INTERNAL": 3, "RESOURCE_EXHAUSTED": 0}[r["status"]]
        assert (r["finish"] is not None) == (r["status"] == "OK")
    assert summary["num_ok"] == sum(r["status"] == "OK" for r in measured) > 0

    # Goodput: every OK request meets SLOs above the known delays.
    goodput = summary["goodput"]
    assert goodput["num_good"] == summary["num_ok"]
    assert goodput["fraction"] == pytest.approx(summary["num_ok"] / summary["num_requests"])
    assert goodput["requests_per_s"] == pytest.approx(summary["request_throughput"])
    assert summary["output_token_throughput"] == pytest.approx(
        sum(r["output_tokens"] for r in measured) / summary["elapsed_s"]
    )


def test_closed_loop_concurrency_and_goodput_slos(fake_gateway):
    address, servicer = fake_gateway
    servicer.reset()
    config = config_from_args(
        parse(
            "--address",
            address,
            "--concurrency",
            "3",
            "--prompt-len",
            "8:15",
            "--output-len",
            "6",
            "--warmup",
            "0.2",
            "--duration",
            "1.0",
            "--drain-timeout",
            "3",
            "--no-plots",
        )  # fmt: skip
    )
    result = asyncio.run(run_serve(config))
    records, summary = result.records, result.summary
    assert servicer.max_in_flight == 3 and summary.max_in_flight == 3
    # Client side too: at no request's start were more than 3 open (counting itself).
    for r in records:
        assert sum(o.start_s <= r.start_s < o.end_s for o in records) <= 3
    assert summary.errors == expected_errors({r.index for r in records if not r.warmup}, servicer)
    assert all(r.status == "OK" for r in records if r.prompt_len % 4 == 0)
    assert summary.num_ok > 0

    # Goodput against SLOs above and below the known delays (50 ms first token, 10 ms gaps). The delays are lower
    # bounds (the fake sleeps at least that long); the margins above them absorb a busy CPU shared with other tests.
    ok = summary.num_ok
    assert summarize(records, config.warmup_s, Slo(ttft_ms=5000, itl_ms=500), 3).goodput.num_good == ok
    assert summarize(records, config.warmup_s, Slo(ttft_ms=45), 3).goodput.num_good == 0
    assert summarize(records, config.warmup_s, Slo(itl_ms=5), 3).goodput.num_good == 0
    assert summarize(records, config.warmup_s, Slo(itl_ms=500), 3).goodput.num_good == ok
    assert summarize(records, config.warmup_s, Slo(), 3).goodput.num_good == ok
    # at least the fake's 10 ms per gap (no upper bound: this machine's CPU can be starved by its host)
    assert statistics.median(r.mean_itl_ms for r in records if r.ok) >= 9


def test_dataset_prompts_and_output_lengths(fake_gateway, tmp_path):
    address, servicer = fake_gateway
    servicer.reset()
    lines = [
        {"messages": [{"role": "user", "content": "hi"}], "output_len": 3},
        {"prompt": "once upon a time", "output_len": 5},
        {"prompt_token_ids": [1, 2, 3, 4]},  # output length from --output-len
        {"prompt_token_ids": [5, 6, 7]},  # odd: RESOURCE_EXHAUSTED
    ]
    path = tmp_path / "conversations.jsonl"
    path.write_text("\n".join(json.dumps(line) for line in lines) + "\n\n")
    config = config_from_args(
        parse(
            "--address",
            address,
            "--concurrency",
            "2",
            "--dataset",
            str(path),
            "--output-len",
            "4",
            "--warmup",
            "0",
            "--duration",
            "0.6",
            "--no-plots",
        )  # fmt: skip
    )
    result = asyncio.run(run_serve(config))
    kinds = Counter((r.prompt_len, r.output_len) for r in result.records)
    # Every line was used: token ids (lengths known to the client, output from --output-len), the conversation
    # (12 tokens, output 3) and the text prompt (16 tokens, output 5), the last two measured through Finish.
    assert set(kinds) == {(4, 4), (3, 4), (MESSAGES_TOKENS, 3), (PROMPT_TOKENS, 5)}, kinds
    for r in result.records:
        if r.prompt_len == 3:
            assert r.status == "RESOURCE_EXHAUSTED" and r.output_tokens == 0
        else:
            assert r.status == "OK" and r.output_tokens == r.output_len
    # Text prompts came as 1 token, then pairs every 20 ms: spread back into two equal gaps of about 10 ms each.
    text = [r for r in result.records if r.prompt_len in (MESSAGES_TOKENS, PROMPT_TOKENS)]
    for r in text:
        assert r.itls_ms[0::2] == pytest.approx(r.itls_ms[1::2])
    assert statistics.median(gap for r in text for gap in r.itls_ms) >= 8


def test_drain_deadline_bounds_the_run(fake_gateway):
    address, servicer = fake_gateway
    servicer.reset()
    # 300 tokens take 3 s; arrivals stop after 0.3 s and the open requests get 0.5 s more.
    config = config_from_args(
        parse(
            "--address",
            address,
            "--concurrency",
            "2",
            "--prompt-len",
            "8",
            "--output-len",
            "300",
            "--warmup",
            "0",
            "--duration",
            "0.3",
            "--drain-timeout",
            "0.5",
            "--no-plots",
        )  # fmt: skip
    )
    started = time.perf_counter()
    result = asyncio.run(run_serve(config))
    assert time.perf_counter() - started < 0.3 + 0.5 + 5.0  # bounded: duration + drain + slack for a slow CPU
    assert result.summary.errors == {"DEADLINE_EXCEEDED": 2}
    assert all(0 < r.output_tokens < 300 for r in result.records)
    deadline = time.monotonic() + 2
    while servicer.in_flight and time.monotonic() < deadline:  # the fake sees the deadline and stops too
        time.sleep(0.01)
    assert servicer.in_flight == 0


def test_unreachable_gateway_is_a_usage_error():
    config = config_from_args(parse("--address", f"127.0.0.1:{free_port()}", "--rate", "1", "--duration", "1"))
    with pytest.raises(UsageError, match="GetModelInfo"):
        asyncio.run(run_serve(config))


def test_spread_token_times():
    # First message: its tokens arrive together; later messages spread over the gap since the previous token.
    assert spread_token_times([(1.0, 1), (1.4, 2), (1.5, 0), (1.7, 3)]) == pytest.approx([1.0, 1.2, 1.4, 1.5, 1.6, 1.7])
    assert spread_token_times([(2.0, 2)]) == [2.0, 2.0]
    assert spread_token_times([]) == []


def test_merge_spans():
    assert merge_spans([(3, 4), (0, 1), (0.5, 2), (2, 2.5)]) == [(0, 2.5), (3, 4)]


def _record(index, start_s, ttft_ms, token_times_ms, prefill_ms=None, handoff_ms=0.0, warmup=False, status="OK"):
    finish = None
    if prefill_ms is not None:
        finish = ServerFinish("LENGTH", 100, len(token_times_ms), 0, f"r{index}", 0.0, prefill_ms, handoff_ms, 0.0,
                              ttft_ms, 0.0)  # fmt: skip
    return RequestRecord(index, warmup, start_s, start_s, 100, len(token_times_ms), status, "", ttft_ms, 0.0,
                         tuple(token_times_ms), finish)  # fmt: skip


def test_itl_split_by_prefill_running():
    # A decoding request (sent at 0, tokens every 10 ms from 105 ms to 505 ms) and two others whose prefills run
    # [0.2, 0.25] s (server timings: first token at 0.26 s, hand-off 10 ms, prefill 50 ms) and [0.4, 0.42] s (no
    # Finish: failed after its first token, counted from sent to first token).
    decoding = _record(0, 0.0, 105.0, [105.0 + 10 * k for k in range(41)], prefill_ms=90.0)
    other = _record(1, 0.2, 60.0, [60.0, 70.0], prefill_ms=50.0, handoff_ms=10.0, warmup=True)
    failed = _record(2, 0.4, 20.0, [20.0], status="INTERNAL")
    spans = prefill_spans([decoding, other, failed])
    # the first span is request 0's own prefill, over before its first gap
    assert [t for span in spans for t in span] == pytest.approx([0.015, 0.105, 0.2, 0.25, 0.4, 0.42])
    during, outside = itl_by_prefill([decoding, other, failed])
    # Gaps of request 0 only (1 is warm-up, 2 failed): [0.2, 0.25] overlaps 6 of them, [0.4, 0.42] 3.
    assert len(during) == 9 and len(outside) == 31
    assert all(g == pytest.approx(10.0) for g in during + outside)
    # A stall inside a prefill lands in `during`; a gap that only touches a span's end is outside (exact binary
    # fractions: the span ends at 0.25 s, the next gap starts there).
    stalled = _record(3, 0.0, 125.0, [125.0, 250.0, 500.0], prefill_ms=62.5)
    other = _record(4, 0.125, 125.0, [125.0], prefill_ms=62.5)
    during, outside = itl_by_prefill([stalled, other])
    assert during == [125.0] and outside == [250.0]


def test_poisson_statistics():
    arrivals = poisson_arrivals(100.0, 200.0, seed=0)
    assert abs(len(arrivals) - 20_000) < 3 * 20_000**0.5
    assert arrivals == sorted(arrivals) and 0 < arrivals[0] and arrivals[-1] < 200.0
    assert poisson_arrivals(100.0, 200.0, seed=0) == arrivals
    assert poisson_arrivals(100.0, 200.0, seed=1) != arrivals


def test_length_ranges_and_bad_arguments(tmp_path):
    assert LengthRange.parse("2048", "--prompt-len") == LengthRange(2048, 2048)
    assert LengthRange.parse("2048:8192", "--prompt-len") == LengthRange(2048, 8192)
    for bad in ("0", "8:4", "a", "1:2:3", "-3"):
        with pytest.raises(UsageError, match="--prompt-len"):
            LengthRange.parse(bad, "--prompt-len")
    with pytest.raises(UsageError, match="--label"):
        config_from_args(parse("--rate", "1", "--label", "a/b"))
    with pytest.raises(UsageError, match="--rate"):
        config_from_args(parse("--rate", "0"))
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "x", "prompt_token_ids": [1]}\n')
    with pytest.raises(UsageError, match="bad.jsonl:1"):
        load_dataset(str(bad))
    with pytest.raises(SystemExit):  # --rate and --concurrency are exclusive, and one is required
        parse("--rate", "1", "--concurrency", "2")

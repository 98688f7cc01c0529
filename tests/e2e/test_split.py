"""The adaptive split and SLO admission through real processes on the CPU (`--split` forces the split on; on the CPU
it is off by default): greedy streams still equal `kvrelay run` while the controller moves, a burst that cannot meet
the TTFT SLO is refused at once with RESOURCE_EXHAUSTED and a reason, and nothing leaks."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys

import grpc
import pytest
import redis
import redis.asyncio

from kvrelay.client import AsyncClient
from kvrelay.deployment import REDIS_URL, Deployment

MAX_TOKENS = 16
QUESTIONS = ["What is the capital of France?", "Give me two rhymes for 'cat'.", "What is 12 times 12?"]
# ~500 tokens each: a dozen queue ~6000 prompt tokens, which a CPU (one thread for prefill) cannot prefill in the SLO
LONG = "The history of the river begins in the mountains, where snow melts each spring. " * 30
SLO_TTFT_MS = 800


@pytest.fixture(scope="module")
def deployment():
    d = Deployment(
        "--split", "--slo-ttft-ms", str(SLO_TTFT_MS), "--slo-itl-ms", "5000",
        "--num-blocks", "768", "--max-batch-tokens", "128", "--max-model-len", "2048",
    )  # fmt: skip
    yield d
    assert d.stop() == 0, d.output()[-3000:]
    assert d.leftovers() == []


@pytest.fixture(scope="module")
def reference() -> dict[str, list[int]]:
    args = [a for q in QUESTIONS for a in ("--prompt", q)]
    out = subprocess.run(
        [sys.executable, "-m", "kvrelay.cli", "run", "--json", "--max-tokens", str(MAX_TOKENS), *args],
        capture_output=True, text=True, check=True,
    ).stdout  # fmt: skip
    return {q: json.loads(line)["token_ids"] for q, line in zip(QUESTIONS, out.splitlines(), strict=True)}


def chat(q: str) -> dict:
    return {"messages": [{"role": "user", "content": q}], "max_tokens": MAX_TOKENS, "temperature": 0.0}


async def outcome(client: AsyncClient, **request) -> tuple[str, list[int], str]:
    """(status name, token ids, details) of one streamed request."""
    tokens: list[int] = []
    try:
        async for chunk in client.generate(**request):
            tokens.extend(chunk.token_ids)
        return "OK", tokens, ""
    except grpc.aio.AioRpcError as exc:
        return exc.code().name, tokens, exc.details() or ""


def test_streams_equal_kvrelay_run_while_decode_pauses_for_prefill(deployment, reference):
    """Decode has all its credit here (an ITL SLO of 5 s on the CPU): it pauses for every pass prefill announces,
    and the streams are still exactly `kvrelay run`'s."""
    announced: list[str] = []

    async def main():
        listener = redis.asyncio.Redis.from_url(REDIS_URL)
        pubsub = listener.pubsub(ignore_subscribe_messages=True)
        await pubsub.subscribe(f"{deployment.name}:split:pass")

        async def listen():
            async for message in pubsub.listen():
                announced.append(message["data"].decode())

        task = asyncio.create_task(listen())
        try:
            async with AsyncClient(deployment.address) as client:
                first = await outcome(client, **chat(QUESTIONS[0]))  # alone: admitted; prefill's speed is measured
                burst = await asyncio.gather(*(outcome(client, **chat(QUESTIONS[i % 3])) for i in range(9)))
        finally:
            task.cancel()
            await pubsub.aclose()
            await listener.aclose()
        return first, burst

    first, burst = asyncio.run(main())
    assert any(m.startswith("start ") for m in announced) and any(m.startswith("end ") for m in announced)
    assert first == ("OK", reference[QUESTIONS[0]], "")
    for i, (status, tokens, details) in enumerate(burst):
        if status == "OK":
            assert tokens == reference[QUESTIONS[i % 3]]
        else:  # the only refusal allowed: the SLO admission's, before any token
            assert status == "RESOURCE_EXHAUSTED" and "predicted time to first token" in details and not tokens
    assert any(status == "OK" for status, *_ in burst)
    # both sides publish what the split runs on (services/split/board.py)
    client = redis.Redis.from_url(REDIS_URL)
    try:
        roles = {key.decode().split(":")[2] for key in client.scan_iter(match=f"{deployment.name}:split:*")}
    finally:
        client.close()
    assert roles == {"prefill", "decode"}
    report, stats = deployment.audit()
    assert report.ok and stats.used == 0, report.message


def test_a_burst_past_the_ttft_slo_is_refused_at_once_and_leaks_nothing(deployment):
    async def main():
        async with AsyncClient(deployment.address) as client:
            await outcome(client, prompt=LONG, max_tokens=2)  # prefill's speed on prompts of this length
            return await asyncio.gather(*(outcome(client, prompt=LONG, max_tokens=4) for _ in range(12)))

    results = asyncio.run(main())
    statuses = [status for status, *_ in results]
    refused = [details for status, _, details in results if status == "RESOURCE_EXHAUSTED"]
    assert set(statuses) <= {"OK", "RESOURCE_EXHAUSTED"}, statuses
    assert "OK" in statuses  # the first of the burst meets an empty queue: never refused
    assert refused, "12 prompts of ~500 tokens queued on a CPU: some must be predicted past an 800 ms TTFT"
    assert all(f"exceeds the {SLO_TTFT_MS} ms SLO" in d and "tokens/s" in d for d in refused), refused[:2]
    report, stats = deployment.audit()
    assert report.ok and stats.used == 0 and stats.active_sessions == 0, report.message

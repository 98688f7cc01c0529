"""End to end through real processes and a real Redis: client -> gateway -> prefill -> decode, against `kvrelay run`."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys

import grpc
import pytest

from kvrelay.client import AsyncClient, Client
from kvrelay.deployment import Deployment
from kvrelay.v1 import gateway_pb2

# A small prefill budget so that long prompts are prefilled in several chunks; a small context for the limit checks.
MAX_BATCH_TOKENS = 64
MAX_MODEL_LEN = 2048
NUM_BLOCKS = 96  # 1536 tokens: enough for 16 concurrent streams here, too few for one prompt near the context limit
QUESTIONS = ["What is the capital of France?", "Give me two rhymes for 'cat'.", "What is 12 times 12?"]
LONG_TEXT = "The history of the river begins in the mountains, where snow melts each spring. " * 12
MAX_TOKENS = 20


@pytest.fixture(scope="module")
def deployment():
    d = Deployment(
        "--num-blocks",
        str(NUM_BLOCKS),
        "--max-batch-tokens",
        str(MAX_BATCH_TOKENS),
        "--max-model-len",
        str(MAX_MODEL_LEN),
    )
    yield d
    assert d.stop() == 0, d.output()[-3000:]
    assert d.leftovers() == []


def kvrelay_run(*args: str) -> list[dict]:
    out = subprocess.run(
        [sys.executable, "-m", "kvrelay.cli", "run", "--json", "--max-tokens", str(MAX_TOKENS), *args],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    return [json.loads(line) for line in out.splitlines()]


@pytest.fixture(scope="module")
def reference():
    """Greedy token ids from the offline CLI, one process, the same default model and settings."""
    chat = kvrelay_run(*[a for q in QUESTIONS for a in ("--prompt", q)])
    raw = kvrelay_run("--raw", "--prompt", LONG_TEXT, "--max-batch-tokens", str(MAX_BATCH_TOKENS))
    refs = {("chat", q): r["token_ids"] for q, r in zip(QUESTIONS, chat, strict=True)}
    return refs | {("raw", LONG_TEXT): raw[0]["token_ids"]}


def chat(q: str) -> dict:
    return {"messages": [{"role": "user", "content": q}], "max_tokens": MAX_TOKENS, "temperature": 0.0}


def test_greedy_equals_kvrelay_run(deployment, reference):
    with Client(deployment.address) as client:
        for q in QUESTIONS:
            streamed = []
            for chunk in client.generate(**chat(q)):
                streamed.extend(chunk.token_ids)
            assert streamed == reference[("chat", q)]
            assert chunk.HasField("finish") and chunk.finish.completion_tokens == len(streamed)


def test_prompt_longer_than_one_prefill_batch(deployment, reference):
    with Client(deployment.address) as client:
        out = client.complete(prompt=LONG_TEXT, max_tokens=MAX_TOKENS, temperature=0.0)
    assert out.finish.prompt_tokens > 2 * MAX_BATCH_TOKENS
    assert list(out.token_ids) == reference[("raw", LONG_TEXT)]


def test_16_concurrent_streams(deployment, reference):
    async def one(client, q):
        tokens = []
        async for chunk in client.generate(**chat(q)):
            tokens.extend(chunk.token_ids)
        return q, tokens

    async def main():
        async with AsyncClient(deployment.address) as client:
            return await asyncio.gather(*(one(client, QUESTIONS[i % len(QUESTIONS)]) for i in range(16)))

    for q, tokens in asyncio.run(main()):
        assert tokens == reference[("chat", q)]
    report, stats = deployment.audit()
    assert report.ok and stats.used == 0, report.message


def test_text_streams_and_stop_string(deployment):
    with Client(deployment.address) as client:
        full = client.complete(**chat("Count from 1 to 10, separated by commas."))
        assert "5" in full.text
        cut = client.complete(**chat("Count from 1 to 10, separated by commas."), stop=["5"])
    assert cut.finish.reason == 2  # FINISH_REASON_STOP_STRING
    assert cut.finish.stop_string == "5"
    assert cut.text == full.text[: full.text.index("5")]


def test_leaving_the_stream_stops_the_generation(deployment):
    """Leaving AsyncClient.generate's loop cancels the call at once: the server stops and frees the blocks long
    before the 1000 tokens asked for would be done (minutes on a CPU; the audit waits 10 s)."""

    async def main():
        async with AsyncClient(deployment.address) as client:
            async for _ in client.generate(**chat(QUESTIONS[1]) | {"max_tokens": 1000}, ignore_eos=True):
                break
            report, stats = await asyncio.to_thread(deployment.audit)
            assert report.ok, report.message
            assert stats.used == 0 and stats.active_sessions == 0  # the channel is still open here

    asyncio.run(main())


def test_blocks_come_back_after_completed_cancelled_and_rejected(deployment):
    async def cancel_mid_stream(client):
        seen = 0
        long = chat("Write a long story about a lighthouse.") | {"max_tokens": 300}  # a leak would outlast the audit
        async for _ in client.generate(**long, ignore_eos=True):
            seen += 1
            if seen == 3:
                break  # leaving the iterator cancels the call: the decode worker must free the session
        return seen

    async def main():
        async with AsyncClient(deployment.address) as client:
            await client.complete(**chat("Say hello."))
            await asyncio.gather(*(cancel_mid_stream(client) for _ in range(4)))
            with pytest.raises(grpc.aio.AioRpcError):
                await client.complete(prompt="x", max_tokens=-1)

    asyncio.run(main())
    report, stats = deployment.audit()
    assert report.ok, report.message
    assert stats.used == 0 and stats.active_sessions == 0


def test_blocks_come_back_when_the_request_ends_at_the_hand_off(deployment):
    """The Decode call is opened with the Prefill call and adopts the session from Redis on its own: a request that
    ends around the hand-off (a stop string in the first token, a client gone after it) leaves nothing behind,
    whether the decode worker had adopted the session yet or not."""
    with Client(deployment.address) as client:
        first = client.complete(**chat(QUESTIONS[0]) | {"max_tokens": 1})
    assert first.text.strip()

    async def leave_after_first(client):
        # 200 tokens: a session left decoding would outlast the audit; 6 of them still fit in the pool
        async for _ in client.generate(**chat(QUESTIONS[0]) | {"max_tokens": 200}, ignore_eos=True):
            break

    async def main():
        async with AsyncClient(deployment.address) as client:
            cut = await client.complete(**chat(QUESTIONS[0]), stop=[first.text.strip()])
            await asyncio.gather(*(leave_after_first(client) for _ in range(6)))
            return cut

    cut = asyncio.run(main())
    assert cut.finish.reason == 2 and cut.finish.completion_tokens == 1  # FINISH_REASON_STOP_STRING at the first
    report, stats = deployment.audit()
    assert report.ok, report.message
    assert stats.used == 0 and stats.active_sessions == 0


def test_deadline_exceeded_frees_blocks(deployment):
    with Client(deployment.address) as client, pytest.raises(grpc.RpcError) as err:
        long = chat("Write a long story about a lighthouse.") | {"max_tokens": 1000}
        client.complete(**long, ignore_eos=True, timeout=1.5)
    assert err.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    report, stats = deployment.audit()
    assert report.ok and stats.used == 0, report.message


BAD = [
    ({"prompt": ""}, grpc.StatusCode.INVALID_ARGUMENT, "empty prompt"),
    ({"prompt": "word " * (MAX_MODEL_LEN + 10)}, grpc.StatusCode.INVALID_ARGUMENT, "context length"),
    ({"prompt": "hi", "max_tokens": 0}, grpc.StatusCode.INVALID_ARGUMENT, "max_tokens"),
    ({"prompt": "hi", "temperature": -0.5}, grpc.StatusCode.INVALID_ARGUMENT, "temperature"),
    ({"prompt": "hi", "top_p": 0.0}, grpc.StatusCode.INVALID_ARGUMENT, "top_p"),
    ({"prompt": "hi", "top_p": 1.5}, grpc.StatusCode.INVALID_ARGUMENT, "top_p"),
    ({"prompt": "hi", "prompt_token_ids": [1, 2]}, grpc.StatusCode.INVALID_ARGUMENT, "exactly one"),
    ({"prompt_token_ids": [10**9]}, grpc.StatusCode.INVALID_ARGUMENT, "vocabulary"),
    ({"messages": [{"role": "wizard", "content": "hi"}]}, grpc.StatusCode.INVALID_ARGUMENT, "role"),
    ({"prompt": "x" * (5 * 2**20)}, grpc.StatusCode.RESOURCE_EXHAUSTED, "larger than max"),
]


@pytest.mark.parametrize("kwargs, code, words", BAD, ids=[b[2] for b in BAD])
def test_bad_input_gets_the_right_status(deployment, kwargs, code, words):
    with Client(deployment.address) as client, pytest.raises(grpc.RpcError) as err:
        client.complete(**kwargs)
    assert err.value.code() == code
    assert words in err.value.details()


def test_unknown_model_is_not_found(deployment):
    with Client(deployment.address) as client, pytest.raises(grpc.RpcError) as err:
        client.stub.Complete(gateway_pb2.GenerateRequest(prompt="hi", model="llama-9000"))
    assert err.value.code() == grpc.StatusCode.NOT_FOUND
    assert "llama-9000" in err.value.details()


def test_no_blocks_for_a_prompt_is_resource_exhausted(deployment):
    # 1600 tokens need 100 blocks of 16; the pool has 96: refused with RESOURCE_EXHAUSTED, nothing leaked
    with Client(deployment.address) as client, pytest.raises(grpc.RpcError) as err:
        client.complete(prompt_token_ids=[100] * 1600, max_tokens=4)
    assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    report, stats = deployment.audit()
    assert report.ok and stats.used == 0, report.message


def test_model_info_and_status(deployment):
    with Client(deployment.address) as client:
        info = client.model_info()
        status = client.status()
    assert info.architecture == "LlamaForCausalLM" and info.max_model_len == MAX_MODEL_LEN
    assert info.num_layers == 30 and info.vocab_size == 49152
    assert status.num_blocks == NUM_BLOCKS
    assert sorted(w.role for w in status.workers) == ["decode", "prefill"]


def test_cli_generate_streams(deployment):
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "kvrelay.cli",
            "generate",
            "--address",
            deployment.address,
            "--max-tokens",
            "12",
            "--json",
            QUESTIONS[0],
        ],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    record = json.loads(out)
    assert "Paris" in record["text"]


def test_logprobs_stream_with_tokens(deployment):
    with Client(deployment.address) as client:
        out = client.complete(**chat(QUESTIONS[0]), logprobs=2)
    assert [lp.token_id for lp in out.logprobs] == list(out.token_ids)
    for lp in out.logprobs:
        assert lp.logprob <= 0 and len(lp.top) == 2
        assert lp.top[0].logprob >= lp.top[1].logprob
        assert lp.top[0].token_id == lp.token_id  # greedy: the chosen token is the most likely one

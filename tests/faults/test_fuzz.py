"""Fuzzing the public API of one real deployment: no request, however malformed, gets UNKNOWN or INTERNAL, restarts a
process or leaks a block.

Requests are random in every field: prompts, messages (roles too), ids, stop strings from a mix of ASCII, unicode,
whitespace, control characters and special tokens; sampling values, max_tokens and logprobs from NaN, infinities,
negatives, zero and huge numbers; prompt_token_ids in and out of the vocabulary; several prompts at once or none;
another model's name. Some are sent as raw bytes (random, or a valid request with bytes flipped), some with a
deadline too short to finish, some are left mid-stream by their client. Half of the session ids come from a small set,
so that turns of one session meet (FAILED_PRECONDITION while another is in flight, prefix reuse when it is IDLE).

    KVRELAY_FUZZ_N=10000 KVRELAY_FUZZ_SEED=7 python -m pytest -s tests/faults/test_fuzz.py

KVRELAY_FUZZ_N requests (default 1000: a few minutes on 2 CPU cores), KVRELAY_FUZZ_SEED for the draw (default: a
random seed, printed), KVRELAY_FUZZ_CONCURRENCY requests at a time (16). The counts by status are printed.
"""

from __future__ import annotations

import asyncio
import math
import os
import random
import time
from collections import Counter

import grpc
import pytest

from kvrelay.deployment import REDIS_URL, Deployment
from kvrelay.rpc.grpc_server import channel_options
from kvrelay.v1 import common_pb2, gateway_pb2, gateway_pb2_grpc
from kvstore.sessions import SessionStore

N = int(os.environ.get("KVRELAY_FUZZ_N", "1000"))
SEED = int(os.environ.get("KVRELAY_FUZZ_SEED", str(random.randrange(2**32))))
CONCURRENCY = int(os.environ.get("KVRELAY_FUZZ_CONCURRENCY", "16"))
MAX_MODEL_LEN = 256  # bounds the longest generation, whatever max_tokens says
NUM_BLOCKS = 96  # 1536 tokens for CONCURRENCY requests of up to 256: they compete for blocks (waits, refusals)
FORBIDDEN = {grpc.StatusCode.UNKNOWN, grpc.StatusCode.INTERNAL}
SERVICE = "kvrelay.v1.Gateway"

ALPHABETS = [
    "abcdefghijklmnopqrstuvwxyz ABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789.,!?-_",
    " \t\n\r\x0b\x0c\u00a0\u2028\u3000",  # whitespace, unicode's too
    "\x00\x01\x07\x1b\x7f\u200b\u200d\ufeff\ufffd",  # control and invisible characters
    "éüñçßøå日本語中文한국어العربيةעבריתрусскийΕλληνικά",
    "🎉👍🏽🧑‍🚀🏳️‍🌈𝔘𝔫𝔦𝔠𝔬𝔡𝔢\U0010ffff",
    ":*?[]{}<>|/\\\"'`$%^&=+~@#",
]
SPECIAL = ["<|im_start|>", "<|im_end|>", "<|endoftext|>", "<s>", "</s>", "{{ messages }}", "{% for %}", "\\u0000"]
ROLES = ["system", "user", "assistant", "tool", "", "User", " user", "wizard", "ユーザー", "user\n", "x" * 300]
FLOATS = [math.nan, math.inf, -math.inf, 0.0, -0.0, -1.0, 1e-30, 1e-6, 0.5, 1.0, 2.0, 1e30, 3.4e38, -3.4e38]
INTS = [-(2**31), -1, 0, 1, 2, 3, 7, 50, 2**31 - 1]


def text(rng: random.Random, longest: int = 80) -> str:
    n = rng.choice([0, 1, 2, rng.randrange(longest + 1), rng.randrange(longest + 1)])
    parts = []
    while sum(map(len, parts)) < n:
        if rng.random() < 0.1:
            parts.append(rng.choice(SPECIAL))
        else:
            alphabet = rng.choice(ALPHABETS)
            parts.append("".join(rng.choice(alphabet) for _ in range(rng.randrange(1, 12))))
    return "".join(parts)[: max(n, 0)] if n else ""


def an_id(rng: random.Random, sessions: list[str]) -> str:
    r = rng.random()
    if r < 0.4:
        return ""
    if r < 0.7:
        return rng.choice(sessions)  # valid, shared: turns of one session meet
    if r < 0.8:
        return rng.choice([" x", "x ", "a:b", "x" * 129, "a\tb", "é", "a*", "\u200b"])
    return text(rng, 40)


def some_float(rng: random.Random) -> float:
    return rng.choice(FLOATS) if rng.random() < 0.6 else rng.uniform(-2, 3)


def request(rng: random.Random, vocab: int, sessions: list[str]) -> gateway_pb2.GenerateRequest:
    """Half of them valid in every field but one at most (to reach the workers), half random in every field."""
    return plausible(rng, vocab, sessions) if rng.random() < 0.5 else chaos(rng, vocab, sessions)


def plausible(rng: random.Random, vocab: int, sessions: list[str]) -> gateway_pb2.GenerateRequest:
    req = gateway_pb2.GenerateRequest(max_tokens=rng.randrange(1, 7), ignore_eos=rng.random() < 0.3)
    kind = rng.choice(["prompt", "messages", "prompt_token_ids"])
    if kind == "prompt":
        req.prompt = text(rng, rng.choice([40, 300])) or "x"
    elif kind == "messages":
        for role in rng.choice([["user"], ["system", "user"], ["user", "assistant", "user"]]):
            req.messages.append(gateway_pb2.ChatMessage(role=role, content=text(rng, 120)))
    else:
        req.prompt_token_ids.extend(rng.randrange(vocab) for _ in range(rng.randrange(1, 120)))
    sampling = req.sampling
    if rng.random() < 0.5:
        sampling.temperature = rng.choice([0.0, 0.7, 1.0, 1.5])
        sampling.top_p = rng.choice([0.1, 0.9, 1.0])
        sampling.top_k = rng.choice([-1, 0, 1, 40])
        sampling.min_p = rng.choice([0.0, 0.05, 1.0])
        sampling.repetition_penalty = rng.choice([0.5, 1.0, 1.3])
    if rng.random() < 0.5:
        sampling.seed = rng.randrange(2**64)
    if rng.random() < 0.3:
        req.stop.extend(text(rng, 6) or "." for _ in range(rng.randrange(1, 4)))
    if rng.random() < 0.2:
        req.stop_token_ids.extend(rng.randrange(vocab) for _ in range(rng.randrange(1, 5)))
    if rng.random() < 0.2:
        req.logprobs = rng.randrange(0, 21)
    req.session_id = rng.choice(["", "", rng.choice(sessions)])
    req.request_id = rng.choice(["", f"r{rng.randrange(10**6)}"])
    if rng.random() < 0.3:  # one field from the chaos
        weird = chaos(rng, vocab, sessions)
        name = rng.choice(["prompt", "sampling", "max_tokens", "stop", "stop_token_ids", "logprobs", "session_id"])
        if name in ("stop", "stop_token_ids"):
            getattr(req, name)[:] = getattr(weird, name)
        elif name != "max_tokens" or weird.HasField("max_tokens"):
            if name == "prompt" and not weird.prompt:
                return req
            if name == "prompt":
                req.ClearField("messages")
                req.ClearField("prompt_token_ids")
            if name == "sampling":
                req.sampling.CopyFrom(weird.sampling)
            else:
                setattr(req, name, getattr(weird, name))
    return req


def chaos(rng: random.Random, vocab: int, sessions: list[str]) -> gateway_pb2.GenerateRequest:
    req = gateway_pb2.GenerateRequest()
    both = ["prompt", "messages"]
    kinds = rng.choice([["prompt"]] * 4 + [["messages"]] * 3 + [["prompt_token_ids"]] * 2 + [[], both])
    if "prompt" in kinds:
        req.prompt = text(rng, rng.choice([40, 300, 2000]))
    if "messages" in kinds:
        for _ in range(rng.choice([0, 1, 1, 2, 3, 6])):
            role = rng.choice(ROLES[:4]) if rng.random() < 0.8 else rng.choice(ROLES)
            req.messages.append(gateway_pb2.ChatMessage(role=role, content=text(rng, 200)))
    if "prompt_token_ids" in kinds:
        n = rng.choice([0, 1, 5, 30, 200, MAX_MODEL_LEN, MAX_MODEL_LEN + 5])
        ids = [rng.randrange(vocab) for _ in range(n)]
        if ids and rng.random() < 0.3:
            ids[rng.randrange(n)] = rng.choice([-1, vocab, 2**31 - 1, -(2**31)])
        req.prompt_token_ids.extend(ids)
    sampling = req.sampling
    for name in ("temperature", "top_p", "min_p", "repetition_penalty"):
        if rng.random() < 0.3:
            setattr(sampling, name, some_float(rng))
    if rng.random() < 0.2:
        sampling.top_k = rng.choice(INTS)
    if rng.random() < 0.2:
        sampling.seed = rng.choice([0, 1, 2**63, 2**64 - 1, rng.randrange(2**64)])
    if rng.random() < 0.8:
        req.max_tokens = rng.choice([1, 2, 3, 4, 6]) if rng.random() < 0.85 else rng.choice(INTS)
    for _ in range(rng.choice([0, 0, 0, 1, 2, 17])):
        req.stop.append(text(rng, rng.choice([4, 300])))
    if rng.random() < 0.2:
        odd = [0, 2, vocab - 1, vocab, -1, 2**31 - 1]
        req.stop_token_ids.extend(rng.choice(odd) for _ in range(rng.choice([1, 3, 70])))
    if rng.random() < 0.2:
        req.logprobs = rng.choice([-1, 0, 1, 5, 20, 21, 2**31 - 1])
    req.ignore_eos = rng.random() < 0.2
    req.request_id = an_id(rng, sessions) if rng.random() < 0.5 else ""
    req.session_id = an_id(rng, sessions)
    if rng.random() < 0.05:
        req.model = rng.choice(["", "SmolLM2-135M-Instruct.Q4_1-98362432-v1", "gpt-4", text(rng, 20)])
    return req


def raw_body(rng: random.Random, vocab: int, sessions: list[str]) -> bytes:
    if rng.random() < 0.5:
        return bytes(rng.randrange(256) for _ in range(rng.choice([0, 1, 3, 10, 100, 1000])))
    body = bytearray(request(rng, vocab, sessions).SerializeToString())
    for _ in range(rng.choice([1, 2, 5])):
        if body:
            body[rng.randrange(len(body))] = rng.randrange(256)
    return bytes(body)


async def one(channel, rng: random.Random, vocab: int, sessions: list[str]) -> str:
    """Send one random request; return its outcome: a status code name, or CLIENT_LEFT."""
    stub = gateway_pb2_grpc.GatewayStub(channel)
    timeout = rng.choice([0.05, 0.5]) if rng.random() < 0.05 else 120
    streaming = rng.random() < 0.6
    try:
        if rng.random() < 0.1:
            body = raw_body(rng, vocab, sessions)
            raw = lambda b: b  # noqa: E731 (the bytes as they are)
            if streaming:
                call = channel.unary_stream(f"/{SERVICE}/Generate", request_serializer=raw)(body, timeout=timeout)
                [m async for m in call]
            else:
                await channel.unary_unary(f"/{SERVICE}/Complete", request_serializer=raw)(body, timeout=timeout)
            return "OK"
        req = request(rng, vocab, sessions)
        if not streaming:
            await stub.Complete(req, timeout=timeout)
            return "OK"
        leave_after = rng.choice([None, None, None, 1, 2])
        call = stub.Generate(req, timeout=timeout)
        seen = 0
        async for _ in call:
            seen += 1
            if seen == leave_after:
                call.cancel()
                return "CLIENT_LEFT"
        return "OK"
    except grpc.aio.AioRpcError as exc:
        if exc.code() in FORBIDDEN:
            return f"{exc.code().name}: {exc.details()}"
        return exc.code().name


async def evict_kept_sessions(deployment: Deployment, timeout_s: float = 60.0) -> None:
    """Once nothing is active (cancellations land asynchronously), free the sessions kept for a next turn (IDLE):
    then every block must be back, which Deployment.audit() checks."""
    async with SessionStore(REDIS_URL, deployment.name) as store:
        deadline = time.monotonic() + timeout_s
        while (await store.stats()).active_sessions and time.monotonic() < deadline:
            await asyncio.sleep(0.2)
        await store.evict_lru(NUM_BLOCKS)


@pytest.fixture(scope="module")
def deployment():
    d = Deployment(
        "--num-blocks",
        str(NUM_BLOCKS),
        "--max-model-len",
        str(MAX_MODEL_LEN),
        "--max-batch-tokens",
        "256",
    )
    yield d
    assert d.stop() == 0, d.output()[-3000:]
    assert d.leftovers() == []


def test_fuzz(deployment):
    rng = random.Random(SEED)
    sessions = [f"fuzz-{SEED % 1000}-{i}" for i in range(8)]
    processes = running(deployment)
    assert len(processes) >= 4, processes  # kvstore, prefill, decode, gateway

    async def main():
        async with grpc.aio.insecure_channel(deployment.address, options=channel_options()) as channel:
            vocab = await gateway_pb2_grpc.GatewayStub(channel).GetModelInfo(gateway_pb2.GetModelInfoRequest())
            vocab = vocab.vocab_size
            limit = asyncio.Semaphore(CONCURRENCY)
            seeds = [rng.randrange(2**32) for _ in range(N)]

            async def limited(seed):
                async with limit:
                    return await one(channel, random.Random(seed), vocab, sessions)

            outcomes = await asyncio.gather(*(limited(s) for s in seeds))
            # the deployment still serves a plain request
            sane = gateway_pb2.GenerateRequest(prompt="Hello", max_tokens=3, sampling=common_pb2.SamplingParams())
            reply = await gateway_pb2_grpc.GatewayStub(channel).Complete(sane, timeout=120)
            return outcomes, reply

    t0 = time.perf_counter()
    outcomes, reply = asyncio.run(main())
    took = time.perf_counter() - t0
    counts = Counter(o.split(":")[0] for o in outcomes)
    print(
        f"\nfuzz: {N} requests, seed {SEED}, deployment {deployment.name}, {took:.0f} s; outcomes by status: "
        f"{dict(counts.most_common())}"
    )
    bad = [o for o in outcomes if o.split(":")[0] in {c.name for c in FORBIDDEN}]
    assert not bad, f"seed {SEED}: {len(bad)} forbidden statuses, e.g. {bad[:5]}"
    assert reply.finish.completion_tokens == 3
    assert running(deployment) == processes, "a process of the deployment died or was restarted"
    asyncio.run(evict_kept_sessions(deployment))
    report, stats = deployment.audit(timeout_s=30)
    assert report.ok and stats.used == 0 and stats.active_sessions == 0, (report.message, stats)
    tracebacks = deployment.output().count("Traceback")
    assert tracebacks == 0, deployment.output()[-5000:]


def running(deployment: Deployment) -> dict[int, str]:
    """The deployment's processes (pid -> command line) but Redis: a restarted one shows with another pid."""
    return {p.pid: p.args for p in deployment.processes() if p.role != "redis"}

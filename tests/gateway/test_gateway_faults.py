"""One client can hurt nobody, through a real deployment (`kvrelay up`: kvstore, prefill, decode, gateway, Redis):

- a huge prompt is tokenized off the gateway's event loop: a concurrent stream's tokens keep flowing meanwhile;
- ids the store would refuse (whitespace, ':') are INVALID_ARGUMENT at the gateway, and requests sent with them
  harm none of their neighbours;
- request bytes that do not parse get INVALID_ARGUMENT, not UNKNOWN, and leave no traceback in the log;
- stop_token_ids outside the vocabulary are INVALID_ARGUMENT;
- Decode.Abort ends the aborted stream with CANCELLED (the client hears it at once) and frees its blocks.
"""

from __future__ import annotations

import asyncio
import time
import uuid

import grpc
import pytest

from kvrelay.client import AsyncClient, Client
from kvrelay.deployment import Deployment
from kvrelay.internal.v1 import decode_pb2_grpc
from kvrelay.rpc.auth import SECRET_ENV, internal_client_interceptors
from kvrelay.rpc.grpc_server import channel_options
from kvrelay.v1 import common_pb2, gateway_pb2

# A gateway that takes (and so tokenizes) prompts up to gRPC's own 4 MiB limit, to measure what that costs the others.
MAX_PROMPT_BYTES = 4_000_000
HUGE_PROMPT = ("The river begins in the mountains, where snow melts each spring. " * 60_000)[:3_900_000]
BAD_UTF8 = b"\x0a\x04ab\xff\xfe"  # GenerateRequest.prompt holding bytes that are not UTF-8
SERVICE = "kvrelay.v1.Gateway"


SECRET = f"test-secret-{uuid.uuid4().hex}"


@pytest.fixture(scope="module")
def deployment():
    # a preset deployment secret: the Abort test calls the decode worker's internal API itself
    env = {"KVRELAY_MAX_PROMPT_BYTES": str(MAX_PROMPT_BYTES), SECRET_ENV: SECRET}
    d = Deployment("--num-blocks", "256", env=env)
    yield d
    assert d.stop() == 0, d.output()[-3000:]
    assert d.leftovers() == []


def audit_clean(deployment: Deployment) -> None:
    report, stats = deployment.audit()
    assert report.ok and stats.used == 0 and stats.active_sessions == 0, report.message


def test_a_huge_prompt_does_not_stall_the_other_streams(deployment):
    """The short stream's largest gap between tokens while the huge prompt is tokenized stays far below the time
    its tokenizing takes (on the event loop it was all of it: ~2.5 s on the release machine)."""

    async def main():
        async with AsyncClient(deployment.address) as client:
            arrivals: list[float] = []
            huge_window: list[float] = []

            async def huge():
                await asyncio.sleep(0)
                t0 = time.perf_counter()
                with pytest.raises(grpc.aio.AioRpcError) as err:
                    await client.complete(prompt=HUGE_PROMPT, max_tokens=4)
                huge_window.extend([t0, time.perf_counter()])
                return err.value

            huge_call = None
            async for _ in client.generate(prompt="Once upon a time", max_tokens=1000, ignore_eos=True):
                arrivals.append(time.perf_counter())
                if len(arrivals) == 5:
                    huge_call = asyncio.create_task(huge())
                if huge_call is not None and huge_call.done() and arrivals[-1] > huge_window[1] + 0.5:
                    break
            return arrivals, huge_window, await huge_call

    arrivals, (start, end), err = asyncio.run(main())
    # refused because it is far longer than the context, but only once tokenized (it is under max_prompt_bytes)
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT and "context length" in err.details()
    tokenizing_s = end - start
    during = [t for t in arrivals if start <= t <= end + 0.2]
    gaps = [b - a for a, b in zip(arrivals, arrivals[1:], strict=False) if start <= b <= end + 0.2]
    assert tokenizing_s > 1.0, f"the huge prompt took only {tokenizing_s:.2f} s: nothing to measure"
    assert len(during) >= 3 and max(gaps) < tokenizing_s / 3, (
        f"longest gap {max(gaps, default=0):.2f} s while the huge prompt took {tokenizing_s:.2f} s"
    )
    audit_clean(deployment)


def test_a_prompt_over_max_prompt_bytes_is_refused_at_once(deployment):
    t0 = time.perf_counter()
    with Client(deployment.address) as client, pytest.raises(grpc.RpcError) as err:
        client.complete(prompt="x" * (MAX_PROMPT_BYTES + 1), max_tokens=4)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "max_prompt_bytes" in err.value.details()
    assert time.perf_counter() - t0 < 2.0  # not tokenized


@pytest.mark.parametrize("field", ["session_id", "request_id"])
def test_bad_ids_are_refused_and_harm_no_neighbour(deployment, field):
    """Before: a session id " x" passed the gateway and failed every prefill batch it joined, its neighbours
    waiting until their deadline or failing with UNKNOWN naming it."""

    async def good(client, i):
        out = await client.complete(prompt=f"Count to {i}.", max_tokens=6, temperature=0.0, timeout=120)
        return out.finish.completion_tokens

    async def bad(client, value):
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await client.complete(prompt="Hello.", max_tokens=6, timeout=120, **{field: value})
        return err.value

    async def main():
        async with AsyncClient(deployment.address) as client:
            calls = [good(client, i) for i in range(4)] + [bad(client, v) for v in (" x", "a:b", "x\n", "é")]
            return await asyncio.gather(*calls)

    done = asyncio.run(main())
    assert done[:4] == [6, 6, 6, 6]
    for err in done[4:]:
        assert err.code() == grpc.StatusCode.INVALID_ARGUMENT and field in err.details()
    audit_clean(deployment)


def test_stop_token_ids_outside_the_vocabulary_are_invalid_argument(deployment):
    with Client(deployment.address) as client:
        vocab = client.model_info().vocab_size
        for ids in ([vocab], [-1], list(range(65))):
            with pytest.raises(grpc.RpcError) as err:
                client.stub.Complete(gateway_pb2.GenerateRequest(prompt="hi", stop_token_ids=ids))
            assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "stop_token_ids" in err.value.details()


def test_undecodable_bytes_get_invalid_argument_and_no_traceback(deployment):
    tracebacks = deployment.output().count("Traceback")

    async def main():
        out = []
        async with grpc.aio.insecure_channel(deployment.address, options=channel_options()) as channel:
            raw = lambda body: body  # noqa: E731 (the bytes as they are)
            generate = channel.unary_stream(f"/{SERVICE}/Generate", request_serializer=raw)
            complete = channel.unary_unary(f"/{SERVICE}/Complete", request_serializer=raw)
            for body in (BAD_UTF8, b"\xff" * 9, b"\x12\x05\x0a\x03\xc3\x28x"):  # the last: a message's role
                with pytest.raises(grpc.aio.AioRpcError) as err:
                    [m async for m in generate(body, timeout=30)]
                out.append(err.value)
                with pytest.raises(grpc.aio.AioRpcError) as err:
                    await complete(body, timeout=30)
                out.append(err.value)
        return out

    for err in asyncio.run(main()):
        assert err.code() == grpc.StatusCode.INVALID_ARGUMENT, (err.code(), err.details())
        assert "kvrelay.v1.GenerateRequest" in err.details()
    time.sleep(0.5)
    assert deployment.output().count("Traceback") == tracebacks, deployment.output()[-3000:]


def test_decode_abort_ends_the_stream_with_cancelled(deployment):
    """decode.proto: a running Decode stream ends with CANCELLED when Abort arrives for its session (it stayed silent
    until its deadline): the client's stream ends with CANCELLED too, and the blocks come back."""
    session = f"abort-{uuid.uuid4().hex[:8]}"

    async def main():
        async with AsyncClient(deployment.address) as client:
            decode = next(w for w in (await client.status()).workers if w.role == "decode")
            seen = 0
            with pytest.raises(grpc.aio.AioRpcError) as err:
                async for _ in client.generate(
                    prompt="Once upon a time", max_tokens=1000, ignore_eos=True, session_id=session, timeout=600
                ):
                    seen += 1
                    if seen == 3:
                        secret = internal_client_interceptors(SECRET)
                        async with grpc.aio.insecure_channel(
                            decode.address, options=channel_options(), interceptors=secret
                        ) as channel:
                            request = common_pb2.AbortRequest(session_id=session, reason="test")
                            reply = await decode_pb2_grpc.DecodeStub(channel).Abort(request, timeout=10)
                            assert reply.found
                        aborted_at = time.perf_counter()
            return err.value, time.perf_counter() - aborted_at

    err, after_s = asyncio.run(main())
    assert err.code() == grpc.StatusCode.CANCELLED and session in err.details()
    assert after_s < 5.0
    audit_clean(deployment)

"""Streams under faults, through real processes (`kvrelay up`, default model, CPU, two decode workers):

- clients that stop reading their streams hold up nobody: a normal client's greedy streams meanwhile equal the
  uninterrupted run at about its pace, and once the stalled clients cancel or their deadline passes, the pool is clean
  and no process restarted;
- kill -9 of the decode worker at the hand-off (while the prompt is being prefilled and the decode worker waits to
  adopt the session, or as soon as prefill's first token reaches the client): the stream goes on on the other decode
  worker and equals an uninterrupted run, and the pool is clean afterwards.

As in test_decode_failover.py the supervisor is paused for the module, and the test starts the killed worker again
itself after each trial. Trials per kill point: KVRELAY_FAULT_TRIALS (3 in CI).
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import threading
import time
import uuid
from pathlib import Path

import grpc
import pytest

from kvrelay.client import AsyncClient, Client, build_request
from kvrelay.deployment import REDIS_URL, Deployment
from kvrelay.v1 import common_pb2, gateway_pb2_grpc
from kvstore.sessions import SessionState, SessionStore
from tests.faults.common import assert_clean, paused_deployment
from tests.faults.test_decode_failover import wait_for_decode_workers

TRIALS = int(os.environ.get("KVRELAY_FAULT_TRIALS", "3"))
PROMPT = "Write a short story about a lighthouse keeper who finds a message in a bottle."
LONG_PROMPT = (Path(__file__).parents[1] / "data" / "english.txt").read_text()[:2400]  # ~550 tokens: a prefill to see


@pytest.fixture(scope="module")
def deployment():
    yield from paused_deployment("--num-blocks", "640", "--max-model-len", "2048", decode_replicas=2)


# -- clients that stop reading -----------------------------------------------------------------------------------------

NORMAL = {"prompt": PROMPT, "max_tokens": 24, "temperature": 0.0, "ignore_eos": True}
# Stalled streams: long, with 20 alternatives' logprobs per token (~250 bytes a message, where a bare token is ~10),
# so that flow control fills within a few tokens instead of thousands.
STALLED = {"prompt": PROMPT, "max_tokens": 1500, "temperature": 0.0, "ignore_eos": True, "logprobs": 20}
# A small receive window (BDP probing off: it would grow the window): the gateway's sends block after ~8 messages.
# With gRPC's defaults the client's transport takes in megabytes unread (1.25 MB of such messages in a probe), which
# this CPU takes minutes to generate.
SMALL_WINDOW = [("grpc.http2.bdp_probe", 0), ("grpc.http2.lookahead_bytes", 2048)]
NUM_STALLED = 4
STALLED_DEADLINE_S = 15.0  # half of the stalled clients wait for their deadline instead of cancelling


async def normal_stream(address: str) -> tuple[list[int], float]:
    t0 = time.monotonic()
    tokens, finish = [], None
    async with AsyncClient(address) as client:
        async for chunk in client.generate(**NORMAL, timeout=300):
            tokens.extend(chunk.token_ids)
            if chunk.HasField("finish"):
                finish = chunk.finish
    assert finish is not None and finish.reason == common_pb2.FINISH_REASON_LENGTH
    return tokens, time.monotonic() - t0


async def stall_and_serve(address: str) -> dict:
    reference, alone_s = await normal_stream(address)
    assert len(reference) == NORMAL["max_tokens"]
    channels = [grpc.aio.insecure_channel(address, options=SMALL_WINDOW) for _ in range(NUM_STALLED)]
    calls = []
    try:
        for i, channel in enumerate(channels):
            timeout = STALLED_DEADLINE_S if i % 2 else 300
            calls.append(gateway_pb2_grpc.GatewayStub(channel).Generate(build_request(**STALLED), timeout=timeout))
        # half read prefill's token (admitted and decoding), half never read at all; none reads again
        for call in calls[::2]:
            first = await call.read()
            assert len(first.token_ids) == 1
        t0 = time.monotonic()
        served = await asyncio.gather(normal_stream(address), normal_stream(address))
        served_s = time.monotonic() - t0
        for call in calls[::2]:
            call.cancel()
        ends = []
        for call in calls:  # the stalled calls' statuses: CANCELLED (by the client) or DEADLINE_EXCEEDED
            ends.append(await call.code())
    finally:
        for channel in channels:
            await channel.close()
    return {"reference": reference, "alone_s": alone_s, "served": served, "served_s": served_s, "ends": ends}


def test_clients_that_stop_reading_hold_up_nobody(deployment):
    before = sorted((p.pid, p.role) for p in deployment.processes())
    out = asyncio.run(stall_and_serve(deployment.address))
    took = [round(s, 1) for _, s in out["served"]]
    print(
        f"uninterrupted {out['alone_s']:.1f}s; beside {NUM_STALLED} stalled streams: {took} "
        f"(both {out['served_s']:.1f}s); stalled calls ended {[c.name for c in out['ends']]}",
        flush=True,
    )
    for tokens, _ in out["served"]:
        assert tokens == out["reference"]
    # about the uninterrupted pace: the stalled streams share the decode batch (and this CPU), they block nothing
    bound = 4 * out["alone_s"] + 10.0
    assert all(s < bound for _, s in out["served"]), (took, bound)
    assert out["ends"] == [grpc.StatusCode.CANCELLED, grpc.StatusCode.DEADLINE_EXCEEDED] * (NUM_STALLED // 2)
    assert_clean(deployment, no_sessions=True)
    assert sorted((p.pid, p.role) for p in deployment.processes()) == before  # nothing died or restarted


# -- kill -9 of the decode worker at the hand-off ----------------------------------------------------------------------

HANDOFF = {"prompt": LONG_PROMPT, "max_tokens": 12, "temperature": 0.0, "ignore_eos": True}


@pytest.fixture(scope="module")
def handoff_reference(deployment):
    with Client(deployment.address) as client:
        out = client.complete(**HANDOFF, timeout=300)
    assert len(out.token_ids) == HANDOFF["max_tokens"]
    return list(out.token_ids)


def handoff_target(d: Deployment, rid: str, states: tuple[SessionState, ...]):
    """The decode worker that owns request `rid`'s session, or claims it while it is not handed over yet, when the
    session is in one of `states`; None otherwise."""

    async def find():
        async with SessionStore(REDIS_URL, d.name) as store:
            for sid in await store._redis.smembers(store.key("sessions")):
                record = await store.get(sid)
                if record is None or record.request_id != rid or record.state not in states:
                    continue
                owner = record.owner
                workers = {w.worker_id: w for w in await store.list_workers("decode")}
                if owner not in workers:  # PREFILLING (prefill's) or PREFILLED: the waiting decode call's claim
                    claim = await store._redis.get(store.key("claim", sid))
                    owner = json.loads(claim)["owner"] if claim else None
                return (record, workers[owner]) if owner in workers else None
            return None

    return asyncio.run(find())


def kill_at(d: Deployment, rid: str, states: tuple[SessionState, ...], timeout_s: float = 60.0):
    """Waits until request `rid`'s session is in one of `states` with a decode worker to own or claim it, and kills
    that worker: (its id, the session's state then, its argv)."""
    deadline = time.monotonic() + timeout_s
    while True:
        found = handoff_target(d, rid, states)
        if found is not None:
            record, worker = found
            return worker.worker_id, record.state, d.kill(d.pid_of(worker), signal.SIGKILL)
        assert time.monotonic() < deadline, f"request {rid} never seen in {states} with a decode worker"
        time.sleep(0.02)


def stream_killing_at(d: Deployment, point: str):
    rid = f"handoff-{uuid.uuid4().hex[:8]}"
    tokens, finish, victim = [], None, []
    watcher = None
    if point == "prefilling":  # the decode call waits for the hand-off, claiming the session
        watcher = threading.Thread(target=lambda: victim.append(kill_at(d, rid, (SessionState.PREFILLING,))))
        watcher.start()
    try:
        with Client(d.address) as client:
            for chunk in client.generate(**HANDOFF, request_id=rid, timeout=300):
                if not tokens and point == "first_token":  # prefill's token is here: decode adopts or has adopted
                    any_state = (SessionState.PREFILLED, SessionState.DECODING)
                    victim.append(kill_at(d, rid, any_state))
                tokens.extend(chunk.token_ids)
                if chunk.HasField("finish"):
                    finish = chunk.finish
    finally:
        if watcher is not None:
            watcher.join()
    assert victim, "no decode worker was killed"
    return tokens, finish, victim[0]


@pytest.mark.parametrize("point", ["prefilling", "first_token"])
def test_kill_9_of_the_decode_worker_at_the_hand_off(deployment, handoff_reference, point):
    for trial in range(TRIALS):
        t0 = time.monotonic()
        tokens, finish, (dead, state, argv) = stream_killing_at(deployment, point)
        took = time.monotonic() - t0
        same = tokens == handoff_reference
        print(f"{point} trial {trial}: killed {dead} ({state.name}); stream {took:.1f}s; equal={same}", flush=True)
        assert finish is not None and finish.reason == common_pb2.FINISH_REASON_LENGTH
        assert finish.completion_tokens == HANDOFF["max_tokens"]
        assert same, (tokens, handoff_reference)
        deployment.respawn(argv)
        try:
            wait_for_decode_workers(deployment, gone=dead)
        except AssertionError as exc:
            said = deployment.respawned_output()[-3000:]
            raise AssertionError(f"{exc}; the respawned worker said:\n{said}") from None
        assert_clean(deployment, no_sessions=True)

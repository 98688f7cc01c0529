"""Decode failover through real processes: kill -9 (or freeze) the decode worker streaming a request at a random token;
the stream goes on on the other decode worker and equals an uninterrupted run, greedy and seeded, ends OK, and the
pool is clean afterwards.

The supervisor (`kvrelay up`) is paused for the module so that the killed worker stays dead; the test starts it again
itself after each trial (Deployment.respawn), as a restarting supervisor would. Trials per sampling mode:
KVRELAY_FAULT_TRIALS (3 in CI; `KVRELAY_FAULT_TRIALS=20 pytest tests/faults/test_decode_failover.py` by hand).
"""

from __future__ import annotations

import asyncio
import os
import random
import signal
import time
import uuid

import pytest

from kvrelay.client import Client
from kvrelay.deployment import REDIS_URL, Deployment
from kvrelay.v1 import common_pb2
from kvstore.sessions import SessionStore
from tests.faults.common import LogTail, assert_clean, paused_deployment

TRIALS = int(os.environ.get("KVRELAY_FAULT_TRIALS", "3"))
MAX_TOKENS = 40
PROMPT = "Write a short story about a lighthouse keeper who finds a message in a bottle."
MODES = {
    "greedy": {"temperature": 0.0},
    "seeded": {"temperature": 0.9, "top_p": 0.95, "seed": 20240611},
}


@pytest.fixture(scope="module")
def deployment():
    yield from paused_deployment("--num-blocks", "256", "--max-model-len", "1024", decode_replicas=2)


def request(mode: str) -> dict:
    return {"prompt": PROMPT, "max_tokens": MAX_TOKENS, "ignore_eos": True, **MODES[mode]}


@pytest.fixture(scope="module")
def reference(deployment):
    """Each mode's tokens, uninterrupted, from the same deployment."""
    out = {}
    with Client(deployment.address) as client:
        for mode in MODES:
            out[mode] = list(client.complete(**request(mode), timeout=300).token_ids)
            assert len(out[mode]) == MAX_TOKENS
    return out


def decode_workers(d: Deployment) -> dict[str, object]:
    async def listed():
        async with SessionStore(REDIS_URL, d.name) as store:
            return {w.worker_id: w for w in await store.list_workers("decode")}

    return asyncio.run(listed())


def wait_for_decode_workers(d: Deployment, gone: str, timeout_s: float = 180.0) -> None:
    """Until the registry lists two decode workers, `gone` not among them (the respawned one has registered)."""
    deadline = time.monotonic() + timeout_s
    while True:
        workers = decode_workers(d)
        if len(workers) == 2 and gone not in workers:
            return
        assert time.monotonic() < deadline, f"decode workers: {sorted(workers)}"
        time.sleep(0.5)


def stream_and_fail(d: Deployment, mode: str, at: int, sig: int):
    """Streams the request, sends `sig` to the decode worker holding its session once `at` tokens arrived."""
    rid = f"failover-{uuid.uuid4().hex[:8]}"
    tokens, finish, victim = [], None, None
    with Client(d.address) as client:
        for chunk in client.generate(**request(mode), request_id=rid, timeout=300):
            tokens.extend(chunk.token_ids)
            if victim is None and len(tokens) >= at:
                owner = d.session_owner(request_id=rid)
                assert owner is not None and owner.role == "decode", owner
                pid = d.pid_of(owner)
                victim = (owner.worker_id, pid, d.kill(pid, sig))
            if chunk.HasField("finish"):
                finish = chunk.finish
    assert victim is not None, f"the stream ended after {len(tokens)} tokens, before the kill"
    return tokens, finish, victim


LOG = LogTail(("resuming session", "tokens to write again"))  # the failover's lines


@pytest.mark.parametrize("mode", list(MODES))
def test_kill_9_of_the_decode_worker_mid_stream(deployment, reference, mode):
    rng = random.Random(f"{mode}-{TRIALS}")
    equal = 0
    for trial in range(TRIALS):
        at = rng.randint(2, MAX_TOKENS - 4)
        t0 = time.monotonic()
        tokens, finish, (dead, _, argv) = stream_and_fail(deployment, mode, at, signal.SIGKILL)
        took = time.monotonic() - t0
        same = tokens == reference[mode]
        equal += same
        print(f"{mode} trial {trial}: killed {dead} at token {at}; stream {took:.1f}s; equal={same}", flush=True)
        LOG.show(deployment)
        assert finish is not None and finish.reason == common_pb2.FINISH_REASON_LENGTH
        assert finish.completion_tokens == MAX_TOKENS
        assert same, (at, tokens, reference[mode])
        deployment.respawn(argv)
        wait_for_decode_workers(deployment, gone=dead)
        assert_clean(deployment)
    print(f"{mode}: {equal}/{TRIALS} streams equal to the uninterrupted run", flush=True)


def test_a_frozen_decode_worker_loses_its_stream_and_wakes_harmlessly(deployment, reference):
    """SIGSTOP: no connection fails; the gateway finds the worker silent and gone from the registry, and moves the
    session. Woken up, the worker finds its registry entry gone, registers again and drops the session it lost
    without touching it."""
    tokens, finish, (frozen, pid, _) = stream_and_fail(deployment, "greedy", 8, signal.SIGSTOP)
    assert tokens == reference["greedy"] and finish.reason == common_pb2.FINISH_REASON_LENGTH
    os.kill(pid, signal.SIGCONT)
    deadline = time.monotonic() + 60
    while frozen not in decode_workers(deployment):  # back in the registry
        assert time.monotonic() < deadline
        time.sleep(0.5)
    assert_clean(deployment)
    with Client(deployment.address) as client:  # both workers serve again
        for _ in range(2):
            assert list(client.complete(**request("greedy"), timeout=300).token_ids) == reference["greedy"]
    assert_clean(deployment)

"""Prefill retry through real processes: kill -9 the prefill worker while it prefills a long prompt (the session is
PREFILLING under it in Redis); the gateway retries on the other prefill worker and the client gets its answer, the
same as an uninterrupted run. An anonymous request starts over under a new session id; a named (multi-turn) session
is taken over by the next prefill worker once the dead one is gone from the registry, and its next turn still reuses
its prefix.

The supervisor is paused for the module and the test restarts the killed worker itself (see test_decode_failover.py).
Trials: KVRELAY_FAULT_TRIALS (3 in CI; 10 by hand).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import os
import random
import time
import uuid
from pathlib import Path

import pytest

from kvrelay.client import Client
from kvrelay.deployment import REDIS_URL, Deployment
from kvstore.sessions import SessionState, SessionStore
from tests.faults.common import LogTail, assert_clean, paused_deployment

TRIALS = int(os.environ.get("KVRELAY_FAULT_TRIALS", "3"))
MAX_TOKENS = 8
MAX_BATCH_TOKENS = 32  # a long prompt takes many chunks: time to kill its worker half-way
LONG_PROMPT = (Path(__file__).parents[1] / "data" / "english.txt").read_text()[:2400]


@pytest.fixture(scope="module")
def deployment():
    yield from paused_deployment(
        "--num-blocks", "256", "--max-model-len", "2048", "--max-batch-tokens", str(MAX_BATCH_TOKENS),
        prefill_replicas=2,
    )  # fmt: skip


def request(**extra) -> dict:
    return {"prompt": LONG_PROMPT, "max_tokens": MAX_TOKENS, "temperature": 0.0, "ignore_eos": True, **extra}


@pytest.fixture(scope="module")
def reference(deployment):
    with Client(deployment.address) as client:
        out = client.complete(**request(), timeout=600)
    assert out.finish.prompt_tokens > 10 * MAX_BATCH_TOKENS
    return list(out.token_ids)


def store_call(d: Deployment, fn):
    async def call():
        async with SessionStore(REDIS_URL, d.name) as store:
            return await fn(store)

    return asyncio.run(call())


def prefilling(d: Deployment, rid: str):
    """The session serving request `rid` while it is PREFILLING, and its prefill worker; None otherwise."""

    async def find(store):
        for sid in await store._redis.smembers(store.key("sessions")):
            record = await store.get(sid)
            if record is not None and record.request_id == rid and record.state == SessionState.PREFILLING:
                workers = {w.worker_id: w for w in await store.list_workers("prefill")}
                if record.owner in workers:
                    return record, workers[record.owner]
        return None

    return store_call(d, find)


def kill_mid_prefill(d: Deployment, rid: str, delay_s: float, timeout_s: float = 120.0):
    """Waits until request `rid` is being prefilled, then `delay_s` more (still prefilling), and kills its worker."""
    deadline = time.monotonic() + timeout_s
    seen = None
    while True:
        found = prefilling(d, rid)
        if found is not None:
            seen = seen or time.monotonic()
            if time.monotonic() - seen >= delay_s:
                record, worker = found
                return record, worker, d.kill(d.pid_of(worker))
        assert time.monotonic() < deadline, "the request was never seen prefilling"
        time.sleep(0.02)


def wait_for_prefill_workers(d: Deployment, gone: str, timeout_s: float = 180.0) -> None:
    deadline = time.monotonic() + timeout_s
    while True:
        workers = {w.worker_id for w in store_call(d, lambda s: s.list_workers("prefill"))}
        if len(workers) == 2 and gone not in workers:
            return
        assert time.monotonic() < deadline, f"prefill workers: {sorted(workers)}"
        time.sleep(0.5)


def run_with_kill(d: Deployment, delay_s: float, **extra):
    rid = f"retry-{uuid.uuid4().hex[:8]}"
    with Client(d.address) as client, concurrent.futures.ThreadPoolExecutor(1) as pool:
        answer = pool.submit(client.complete, **request(**extra), request_id=rid, timeout=600)
        try:
            record, worker, argv = kill_mid_prefill(d, rid, delay_s)
        except BaseException:
            answer.cancel()
            raise
        out = answer.result(timeout=600)
    return out, record, worker, argv


# the retry's lines; the anonymous request's first session, PREFILLING under the dead worker, goes with its lease
LOG = LogTail(("retrying", "took over session"))


def test_kill_9_of_the_prefill_worker_mid_prefill(deployment, reference):
    rng = random.Random(TRIALS)
    completed = 0
    for trial in range(TRIALS):
        delay = rng.uniform(0.0, 1.0)
        t0 = time.monotonic()
        out, record, worker, argv = run_with_kill(deployment, delay)
        ok = list(out.token_ids) == reference and out.finish.completion_tokens == MAX_TOKENS
        completed += ok
        print(
            f"prefill trial {trial}: killed {worker.worker_id} {delay:.2f}s into the prefill of session "
            f"{record.session_id} ({len(record.block_table)} blocks); answered in {time.monotonic() - t0:.1f}s "
            f"under session {out.finish.session_id}; complete={ok}",
            flush=True,
        )
        LOG.show(deployment)
        assert ok, (list(out.token_ids), reference)
        assert out.finish.session_id != record.session_id  # an anonymous request starts over under a new key
        deployment.respawn(argv)
        wait_for_prefill_workers(deployment, gone=worker.worker_id)
        assert_clean(deployment)
    print(f"prefill: {completed}/{TRIALS} requests complete", flush=True)


def test_a_named_session_is_taken_over_and_keeps_its_prefix(deployment, reference):
    sid = f"named{uuid.uuid4().hex[:8]}"
    out, record, worker, argv = run_with_kill(deployment, 0.3, session_id=sid)
    LOG.show(deployment)
    assert list(out.token_ids) == reference and out.finish.session_id == sid == record.session_id
    # the other prefill worker took the half-written session over (not a lease expiry and a fresh start)
    assert f"took over session {sid}" in deployment.output() + deployment.respawned_output()
    # the next turn finds the session IDLE with the first turn's tokens, and reuses them
    with Client(deployment.address) as client:
        turn2 = client.complete(prompt=LONG_PROMPT + " And then?", max_tokens=4, session_id=sid, timeout=600)
    assert turn2.finish.cached_prompt_tokens >= out.finish.prompt_tokens - 1
    assert store_call(deployment, lambda s: s.free(sid)) > 0
    deployment.respawn(argv)
    wait_for_prefill_workers(deployment, gone=worker.worker_id)
    assert_clean(deployment)

"""The decode worker's side of the hand-off: waiting for prefill's offer, and never leaking a session whose adoption
lands after the call was cancelled (against a scripted session store); the claimed hand-off, where prefill's update
hands the session over and no adopt round trip is left (against a real Redis)."""

from __future__ import annotations

import asyncio
import os
import uuid
from types import SimpleNamespace

import pytest
import torch

from kvrelay.internal.v1 import decode_pb2
from kvrelay.sampling import SamplingParams, params_to_proto
from kvrelay.settings import DecodeSettings
from kvstore.sessions import SessionRecord, SessionState, SessionStore, WrongState
from services.decode import server as decode_server
from services.decode.server import DecodeWorker
from tests.kvstore.test_sessions import _SKIP as _NO_REDIS
from tests.kvstore.test_sessions import REDIS_URL

PROMPT = [5, 6, 7, 8]


def record(request_id: str = "r1") -> SessionRecord:
    return SessionRecord(
        session_id="s",
        state=SessionState.DECODING,
        owner="decode-test",
        num_tokens=len(PROMPT),
        first_token=42,
        request_id=request_id,
        created_ms=0,
        updated_ms=0,
        lease_expires_ms=1,
        block_table=(3, 4),
    )


class ScriptedStore:
    """adopt() fails with WrongState until `offered`, and then waits for `land` (a slow Redis) if given."""

    def __init__(self) -> None:
        self.offered = False
        self.land: asyncio.Event | None = None
        self.attempts: list[dict] = []
        self.unclaimed: list[tuple] = []

    async def unclaim(self, session_id, owner, request_id) -> int:
        self.unclaimed.append((session_id, owner, request_id))
        return 0

    async def adopt(self, session_id, owner, lease_ms, **kwargs) -> SessionRecord:
        self.attempts.append(kwargs)
        if not self.offered:
            raise WrongState(f"session {session_id} is PREFILLING, expected PREFILLED")
        if self.land is not None:
            await self.land.wait()
        return record(kwargs.get("expected_request") or "r1")


def worker(store: ScriptedStore) -> DecodeWorker:
    w = DecodeWorker(DecodeSettings(worker_id="decode-test", host="127.0.0.1", port=1, overlap=True))
    w.store = store
    w.attached = SimpleNamespace(runner=SimpleNamespace(device=torch.device("cpu")))
    return w


def request(**kwargs) -> decode_pb2.DecodeRequest:
    return decode_pb2.DecodeRequest(
        session_id="s",
        request_id="r1",
        sampling=params_to_proto(SamplingParams(max_tokens=8)),
        token_ids=PROMPT,
        **kwargs,
    )


def test_a_waiting_call_adopts_its_session_when_the_offer_is_announced(monkeypatch):
    monkeypatch.setattr(decode_server, "PREFILL_POLL_S", 30.0)  # only the announcement can wake it in time

    async def main():
        store = ScriptedStore()
        w = worker(store)
        waiting = asyncio.create_task(w._adopt_when_prefilled(request(await_prefill=True), list(PROMPT)))
        await asyncio.sleep(0.05)
        assert not waiting.done() and len(store.attempts) == 1  # tried at once: not offered yet
        assert store.attempts[0]["expected_state"] is SessionState.PREFILLED
        assert store.attempts[0]["expected_request"] == "r1" and store.attempts[0]["extra_tokens"] == 1
        store.offered = True
        for notice in w.awaiting["s"]:  # what handoff_listener does when Redis announces the session
            notice.set()
        adopted, _ = await asyncio.wait_for(waiting, 5)
        assert adopted.block_table == (3, 4) and len(store.attempts) == 2
        assert w.awaiting == {}

    asyncio.run(main())


def test_a_waiting_call_polls_when_announcements_are_lost(monkeypatch):
    monkeypatch.setattr(decode_server, "PREFILL_POLL_S", 0.05)

    async def main():
        store = ScriptedStore()
        w = worker(store)
        waiting = asyncio.create_task(w._adopt_when_prefilled(request(await_prefill=True), list(PROMPT)))
        await asyncio.sleep(0.12)
        store.offered = True
        adopted, _ = await asyncio.wait_for(waiting, 5)
        assert adopted.first_token == 42 and len(store.attempts) >= 3

    asyncio.run(main())


@pytest.mark.parametrize("keep_session", [False, True])
def test_an_adoption_that_lands_after_the_call_was_cancelled_is_given_back(keep_session):
    async def main():
        store = ScriptedStore()
        store.offered, store.land = True, asyncio.Event()
        w = worker(store)
        req = request(await_prefill=True, keep_session=keep_session)
        waiting = asyncio.create_task(w._adopt_when_prefilled(req, list(PROMPT)))
        await asyncio.sleep(0.05)  # adopt() is in flight in Redis
        waiting.cancel()
        with pytest.raises(asyncio.CancelledError):
            await waiting
        assert w.running == [] and w.awaiting == {}
        await asyncio.sleep(0)
        assert store.unclaimed == [("s", "decode-test", "r1")]  # its claim goes (and what it was handed)
        store.land.set()  # the adoption lands: the session is ours, so it must reach the step loop to be freed
        await asyncio.sleep(0.05)
        assert len(w.running) == 1
        seq = w.running[0]
        assert seq.cancelled and seq.keep_session == keep_session and seq.block_table == [3, 4]
        assert seq.history[: seq.num_cached] == PROMPT  # what a kept session records for its next turn
        assert w.wakeup.is_set()

    asyncio.run(main())


# -- the claimed hand-off, against a real Redis --------------------------------------------------------------------

needs_redis = pytest.mark.skipif(_NO_REDIS is not None, reason=_NO_REDIS or "")


class CountingStore(SessionStore):
    """A real SessionStore that counts adopt round trips."""

    adopts = 0

    async def adopt(self, *args, **kwargs):
        self.adopts += 1
        return await super().adopt(*args, **kwargs)


def with_redis(body, poll_s: float | None = None):
    async def main():
        store = await CountingStore.connect(REDIS_URL, prefix=new_prefix())
        try:
            await store.init_pool(16, 4)
            await body(store, worker(store))
        finally:
            await store.wipe()
            await store.close()

    asyncio.run(main())


async def prefill_hands_off(store: SessionStore, request_id: str = "r1") -> bool:
    """What the prefill worker does: blocks for the prompt, then PREFILLED with its first token."""
    await store.allocate("s", 1, "prefill-test", 10_000)
    return await store.update(
        "s",
        "prefill-test",
        SessionState.PREFILLED,
        lease_ms=5000,
        num_tokens=len(PROMPT),
        first_token=42,
        request_id=request_id,
    )


async def until(condition, timeout: float = 5.0) -> None:
    for _ in range(int(timeout / 0.01)):
        if condition():
            return
        await asyncio.sleep(0.01)
    raise AssertionError("timed out")


@needs_redis
def test_a_claimed_handoff_reaches_the_waiting_call_without_an_adopt_round_trip(monkeypatch):
    monkeypatch.setattr(decode_server, "PREFILL_POLL_S", 30.0)  # only the announcement can wake it in time

    async def body(store, w):
        listener = asyncio.create_task(w.handoff_listener())
        await asyncio.sleep(0.1)  # subscribed
        waiting = asyncio.create_task(w._adopt_when_prefilled(request(await_prefill=True), list(PROMPT)))
        await until(lambda: store.adopts == 1)  # tried once: nothing to adopt yet, a claim left
        await asyncio.sleep(0.05)
        assert await prefill_hands_off(store)  # handed to the claim by prefill's own update
        record, _ = await asyncio.wait_for(waiting, 5)
        assert store.adopts == 1  # no second round trip
        assert record.owner == "decode-test" and record.state is SessionState.DECODING and record.first_token == 42
        assert len(record.block_table) == 2  # the block of the first decode token came with it
        assert w.awaiting == {} and w.handed == {}
        listener.cancel()
        await store.free("s", owner="decode-test")
        assert (await store.audit()).ok

    with_redis(body)


@needs_redis
def test_a_claimed_handoff_whose_announcement_is_lost_is_taken_by_the_poll(monkeypatch):
    monkeypatch.setattr(decode_server, "PREFILL_POLL_S", 0.05)

    async def body(store, w):  # no listener: every announcement is lost
        waiting = asyncio.create_task(w._adopt_when_prefilled(request(await_prefill=True), list(PROMPT)))
        await until(lambda: store.adopts >= 1)
        assert await prefill_hands_off(store)
        record, _ = await asyncio.wait_for(waiting, 5)
        assert record.owner == "decode-test" and record.request_id == "r1"
        await store.free("s", owner="decode-test")
        assert (await store.audit()).ok

    with_redis(body)


@needs_redis
@pytest.mark.parametrize("order", ["handed, then cancelled", "cancelled, then offered"])
def test_a_call_that_gives_up_leaks_nothing(monkeypatch, order):
    """Cancelled after prefill handed it the session (announcement lost): the session is freed. Cancelled before:
    its claim goes, and prefill's hand-off is offered to anyone (the gateway frees an unadopted one)."""
    monkeypatch.setattr(decode_server, "PREFILL_POLL_S", 30.0)

    async def body(store, w):
        waiting = asyncio.create_task(w._adopt_when_prefilled(request(await_prefill=True), list(PROMPT)))
        await until(lambda: store.adopts == 1)
        await asyncio.sleep(0.05)
        if order.startswith("handed"):
            assert await prefill_hands_off(store)
        waiting.cancel()
        with pytest.raises(asyncio.CancelledError):
            await waiting
        if order.startswith("handed"):
            for _ in range(100):
                if await store.get("s") is None:
                    break
                await asyncio.sleep(0.01)
            assert await store.get("s") is None  # freed by the call's unclaim
        else:
            await asyncio.sleep(0.1)  # the unclaim lands
            assert await prefill_hands_off(store) is False  # no claim left: offered, not handed
            assert (await store.get("s")).state is SessionState.PREFILLED
            await store.free("s", expected_state=SessionState.PREFILLED, expected_request="r1")  # the gateway's part
        assert (await store.audit()).ok

    with_redis(body)


def new_prefix() -> str:
    """A key prefix of its own, marked with this test run (tests/conftest.py checks the run leaves none behind)."""
    return f"kvtest{os.environ.get('KVRELAY_TEST_RUN', '')}-{uuid.uuid4().hex[:12]}"

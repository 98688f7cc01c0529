"""The decode worker's side of the hand-off, against a scripted session store: waiting for prefill's offer, and never
leaking a session whose adoption lands after the call was cancelled."""

from __future__ import annotations

import argparse
import asyncio
from types import SimpleNamespace

import pytest
import torch

from kvrelay.v1 import decode_pb2
from kvstore.sessions import SessionRecord, SessionState, WrongState
from services.common.convert import params_to_proto
from services.decode import server as decode_server
from services.decode.server import DecodeWorker
from services.model.sampling_params import SamplingParams

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

    async def adopt(self, session_id, owner, lease_ms, **kwargs) -> SessionRecord:
        self.attempts.append(kwargs)
        if not self.offered:
            raise WrongState(f"session {session_id} is PREFILLING, expected PREFILLED")
        if self.land is not None:
            await self.land.wait()
        return record(kwargs.get("expected_request") or "r1")


def worker(store: ScriptedStore) -> DecodeWorker:
    w = DecodeWorker(argparse.Namespace(worker_id="decode-test", host="127.0.0.1", port=1, no_overlap=False))
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
        for notice in w.awaiting["s"]:  # what prefilled_listener does when Redis announces the session
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
        store.land.set()  # the adoption lands: the session is ours, so it must reach the step loop to be freed
        await asyncio.sleep(0.05)
        assert len(w.running) == 1
        seq = w.running[0]
        assert seq.cancelled and seq.keep_session == keep_session and seq.block_table == [3, 4]
        assert seq.history[: seq.num_cached] == PROMPT  # what a kept session records for its next turn
        assert w.wakeup.is_set()

    asyncio.run(main())

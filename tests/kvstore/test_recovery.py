"""Redis faults at the session store: a pool whose state Redis lost is rebuilt from what live workers re-assert, and
every script is harmless to repeat (a caller whose reply was lost calls again). Against a real Redis, each test under
its own prefix (tests/kvstore/test_sessions.py's `run`), never flushing anything but its own keys."""

from __future__ import annotations

import time

import pytest

from kvstore.sessions import (
    HeldSession,
    PoolNotInitialized,
    PoolRecovering,
    RecoveryClosed,
    SessionState,
    SessionStore,
    StoreUnavailable,
    WrongState,
)
from tests.kvstore.test_sessions import _SKIP, LEASE, run

pytestmark = pytest.mark.skipif(_SKIP is not None, reason=_SKIP or "")
WINDOW = 300  # ms: the recovery window of these tests


async def lose_state(store: SessionStore) -> None:
    """What a Redis restart without persistence does to this prefix (a FLUSHALL of its keys only)."""
    await store.wipe()


async def until_recovered(store: SessionStore, num_blocks: int, block_size: int) -> None:
    deadline = time.monotonic() + 5
    while await store.recover_pool(num_blocks, block_size, WINDOW) != "recovered":
        assert time.monotonic() < deadline
        time.sleep(0.05)


def test_the_free_list_is_rebuilt_from_the_living():
    async def body(store: SessionStore) -> None:
        assert await store.recover_pool(16, 4, WINDOW) == "ok"
        epoch = (await store.pool_state()).epoch
        dec = await store.allocate("dec", 3, "d1", LEASE)
        await store.update("dec", "d1", SessionState.DECODING, num_tokens=9)
        pre = await store.allocate("pre", 2, "p1", LEASE, request_id="r1")
        await store.allocate("idle", 4, "p1", LEASE)
        await store.release("idle", "p1")
        await lose_state(store)

        assert (await store.pool_state()).epoch == ""
        with pytest.raises(PoolNotInitialized):
            await store.reassert("d1", "decode", "h:1", LEASE, LEASE, [])
        assert await store.recover_pool(16, 4, WINDOW) == "recreated"
        state = await store.pool_state()
        assert state.recovering and state.epoch not in ("", epoch)
        with pytest.raises(PoolRecovering):  # the free-list is not known yet
            await store.allocate("new", 1, "p1", LEASE)
        held = HeldSession("dec", SessionState.DECODING, 9, "r0", tuple(dec))
        assert await store.reassert("d1", "decode", "h:1", LEASE, LEASE, [held]) == []
        assert await store.reassert("d1", "decode", "h:1", LEASE, LEASE, [held]) == []  # a repeat: accepted
        clash = HeldSession("x", SessionState.DECODING, 1, None, (dec[0],))
        theirs = HeldSession("pre", SessionState.PREFILLING, 0, "r1", tuple(pre))
        assert await store.reassert("p1", "prefill", "h:2", LEASE, LEASE, [clash, theirs]) == ["x"]
        assert await store.worker_registered("d1") and await store.worker_registered("p1")
        assert not await store.worker_gone("gone")  # recovering: a missing entry proves nothing yet
        assert await store.recover_pool(16, 4, WINDOW) == "recovering"

        await until_recovered(store, 16, 4)
        assert not (await store.pool_state()).recovering
        assert await store.worker_gone("gone")
        with pytest.raises(RecoveryClosed):
            await store.reassert("late", "decode", "h:3", LEASE, LEASE, [])
        record = await store.get("dec")
        assert record.owner == "d1" and record.state == SessionState.DECODING and record.num_tokens == 9
        assert record.block_table == tuple(dec) and record.request_id == "r0"
        assert (await store.get("idle")) is None  # nobody holds an idle session: its blocks are free
        stats = await store.stats()
        assert stats.free == 16 - 5 and stats.active_sessions == 2
        assert (await store.audit(allow_active=True)).ok
        for sid, owner in (("dec", "d1"), ("pre", "p1")):
            await store.free(sid, owner)
        report = await store.audit()
        assert report.ok and (await store.stats()).free == 16, report.message

    run(body)


def test_a_session_freed_during_the_window_is_not_freed_twice():
    async def body(store: SessionStore) -> None:
        blocks = await store.allocate("s", 2, "d1", LEASE)
        await lose_state(store)
        assert await store.recover_pool(8, 4, WINDOW) == "recreated"
        held = HeldSession("s", SessionState.DECODING, 5, None, tuple(blocks))
        assert await store.reassert("d1", "decode", "h:1", LEASE, LEASE, [held]) == []
        assert await store.free("s", "d1") == 2
        await until_recovered(store, 8, 4)
        report = await store.audit()
        assert report.ok and (await store.stats()).free == 8, report.message

    run(body, num_blocks=8)


def test_scripts_are_harmless_to_repeat():
    """The second call of each stands for a retry after a reply lost to a timeout."""

    async def body(store: SessionStore) -> None:
        first = await store.allocate("s", 2, "p1", LEASE, request_id="r", have=0)
        assert await store.allocate("s", 2, "p1", LEASE, request_id="r", have=0) == first
        more = await store.allocate("s", 1, "p1", LEASE, create=False, have=2)
        assert await store.allocate("s", 1, "p1", LEASE, create=False, have=2) == more
        assert (await store.stats()).free == 16 - 3
        # a hand-off taken by the claiming decode worker in the same script: the repeat succeeds, changing nothing
        with pytest.raises(WrongState):  # not offered yet: the call leaves its claim
            await store.adopt("s", "d1", LEASE, SessionState.PREFILLED, expected_request="r", claim_ms=5_000)
        assert await store.update("s", "p1", SessionState.PREFILLED, lease_ms=LEASE, num_tokens=5, request_id="r")
        assert not await store.update("s", "p1", SessionState.PREFILLED, lease_ms=LEASE, num_tokens=5, request_id="r")
        record = await store.get("s")
        assert record.owner == "d1" and record.state == SessionState.DECODING
        again = await store.adopt("s", "d1", LEASE, SessionState.PREFILLED, expected_request="r")
        assert again.owner == "d1" and again.block_table == record.block_table
        await store.release("s", "d1")
        await store.release("s", "d1")
        assert (await store.get("s")).state == SessionState.IDLE
        assert (await store.audit()).ok

    run(body)


def test_an_unreachable_redis_fails_within_the_retry_budget():
    import asyncio

    from kvrelay.deployment import free_port_run

    async def main() -> None:
        port = free_port_run(1)
        store = SessionStore(f"redis://:secret@127.0.0.1:{port}/0", "kvtest-nowhere", retry_s=0.5)
        try:
            started = time.monotonic()
            with pytest.raises(StoreUnavailable) as err:
                await store.stats()
            assert time.monotonic() - started < 3
            assert f"session store unreachable at redis://:***@127.0.0.1:{port}/0" in str(err.value)
            assert "secret" not in str(err.value)
        finally:
            await store.close()

    asyncio.run(main())

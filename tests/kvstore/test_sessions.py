"""SessionStore against a real Redis: atomic allocation, ownership and leases, idle LRU, worker registry, audit.

Each test runs under its own random key prefix and deletes its keys at the end, so tests can share a Redis (and run
next to a live deployment using another prefix). Skipped when no Redis answers at REDIS_URL (default
redis://127.0.0.1:6379/0).
"""

from __future__ import annotations

import asyncio
import os
import uuid
from collections.abc import Awaitable, Callable

import pytest
import redis

from kvstore.allocator import OutOfBlocks
from kvstore.sessions import (
    NotOwner,
    PoolGeometryMismatch,
    SessionNotFound,
    SessionState,
    SessionStore,
    WrongState,
)

REDIS_URL = os.environ.get("REDIS_URL", "redis://127.0.0.1:6379/0")


def _redis_answers() -> str | None:
    try:
        redis.Redis.from_url(REDIS_URL, socket_connect_timeout=0.5, socket_timeout=0.5).ping()
    except Exception as exc:
        return f"no Redis answers at {REDIS_URL} (set REDIS_URL): {exc}"
    return None


_SKIP = _redis_answers()
pytestmark = pytest.mark.skipif(_SKIP is not None, reason=_SKIP or "")

LEASE = 10_000  # ms: long enough never to expire during a test unless the test wants it to
SHORT = 50  # ms: leases that a test lets expire


def run(body: Callable[[SessionStore], Awaitable[None]], num_blocks: int = 16, block_size: int = 4) -> None:
    """Runs body against a fresh pool under a unique prefix, then deletes every key of that prefix."""

    async def main() -> None:
        store = await SessionStore.connect(REDIS_URL, prefix=new_prefix())
        try:
            await store.init_pool(num_blocks, block_size)
            await body(store)
        finally:
            await store.wipe()
            await store.close()

    asyncio.run(main())


def raw(store: SessionStore) -> redis.asyncio.Redis:
    return store._redis  # for tests that corrupt the pool by hand


# -- allocation ---------------------------------------------------------------------------------------------------


def test_allocate_takes_nothing_when_short():
    async def body(store: SessionStore) -> None:
        a = await store.allocate("a", 5, "p1", LEASE)
        assert len(a) == 5 and len(set(a)) == 5
        with pytest.raises(OutOfBlocks) as exc:
            await store.allocate("b", 4, "p1", LEASE)
        assert (exc.value.needed, exc.value.free) == (4, 3)
        assert await store.get("b") is None  # a failed allocation does not create the session either
        with pytest.raises(OutOfBlocks):
            await store.allocate("a", 4, "p1", LEASE)  # nor grow an existing one
        assert (await store.get("a")).block_table == tuple(a)
        stats = await store.stats()
        assert (stats.free, stats.used, stats.active_sessions) == (3, 5, 1)
        assert (await store.audit(allow_active=True)).ok

    run(body, num_blocks=8)


def test_allocate_appends_to_existing_session():
    async def body(store: SessionStore) -> None:
        first = await store.allocate("s", 2, "p1", LEASE)
        record = await store.get("s")
        assert record.state is SessionState.PREFILLING and record.owner == "p1" and record.num_tokens == 0
        second = await store.allocate("s", 3, "p1", LEASE)
        assert (await store.get("s")).block_table == tuple(first + second)
        assert len(set(first + second)) == 5
        assert await store.allocate("s", 0, "p1", LEASE) == []
        with pytest.raises(NotOwner, match="owned by p1"):
            await store.allocate("s", 1, "p2", LEASE)
        with pytest.raises(SessionNotFound):
            await store.allocate("gone", 1, "p1", LEASE, create=False)
        assert await store.get("gone") is None
        assert (await store.audit(allow_active=True)).ok

    run(body)


def test_concurrent_allocators_never_share_a_block():
    async def body(store: SessionStore) -> None:
        async def one(i: int) -> list[int]:
            try:
                return await store.allocate(f"s{i}", 3 + i % 2, f"w{i % 5}", LEASE)
            except OutOfBlocks:
                return []

        # 50 allocators want 175 blocks of 120: some fail, whole; the winners never share a block.
        results = await asyncio.gather(*(one(i) for i in range(50)))
        taken = [b for r in results for b in r]
        assert len(taken) == len(set(taken))
        assert 100 < len(taken) <= 120
        assert (await store.stats()).free == 120 - len(taken)
        for i, blocks in enumerate(results):
            record = await store.get(f"s{i}")
            assert (record.block_table if record else ()) == tuple(blocks)
        report = await store.audit(allow_active=True)
        assert report.ok, report.message

    run(body, num_blocks=120)


def test_large_block_table_round_trip():
    async def body(store: SessionStore) -> None:
        # More ids than Lua's unpack() can take at once: the scripts push in chunks.
        blocks = await store.allocate("big", 9_500, "p1", LEASE)
        assert sorted(blocks) == list(range(9_500))
        assert await store.free("big") == 9_500
        assert (await store.stats()).free == 10_000
        assert (await store.audit()).ok

    run(body, num_blocks=10_000)


def test_free_is_idempotent_and_fenced():
    async def body(store: SessionStore) -> None:
        await store.allocate("s", 3, "d1", LEASE)
        with pytest.raises(NotOwner):
            await store.free("s", owner="d2")
        assert await store.free("s", owner="d1") == 3
        assert await store.free("s") == 0
        assert await store.free("never-existed") == 0
        assert await store.get("s") is None
        assert (await store.stats()).free == 16
        report = await store.audit()
        assert report.ok, report.message

    run(body)


# -- ownership and hand-off ---------------------------------------------------------------------------------------


def test_update_only_by_owner():
    async def body(store: SessionStore) -> None:
        await store.allocate("s", 2, "p1", LEASE)
        await store.update("s", "p1", SessionState.PREFILLED, num_tokens=7, first_token=42, request_id="r-1")
        record = await store.get("s")
        assert (record.state, record.num_tokens, record.first_token, record.request_id) == ("PREFILLED", 7, 42, "r-1")
        with pytest.raises(NotOwner):
            await store.update("s", "p2", "DECODING")
        with pytest.raises(SessionNotFound):
            await store.update("nope", "p1", "DECODING")
        with pytest.raises(ValueError, match="exceeds"):
            await store.update("s", "p1", None, num_tokens=9)  # 2 blocks x 4 tokens
        with pytest.raises(ValueError, match="release"):
            await store.update("s", "p1", SessionState.IDLE)
        with pytest.raises(TypeError):
            await store.update("s", "p1", None, owner="p2")
        assert (await store.get("s")).num_tokens == 7

    run(body)


def test_adopt_hands_off_a_prefilled_session_once():
    async def body(store: SessionStore) -> None:
        blocks = await store.allocate("s", 2, "p1", LEASE)
        await store.update("s", "p1", "PREFILLED", num_tokens=5, first_token=9)
        record = await store.adopt("s", "d1", LEASE, expected_state="PREFILLED")
        assert record.state is SessionState.DECODING and record.owner == "d1"
        assert record.block_table == tuple(blocks) and (record.num_tokens, record.first_token) == (5, 9)
        assert await store.adopt("s", "d1", LEASE) == await store.get("s")  # a retry by the owner succeeds
        with pytest.raises(WrongState):
            await store.adopt("s", "d2", LEASE, expected_state="PREFILLED")
        with pytest.raises(NotOwner, match="owned by d1"):
            await store.adopt("s", "d2", LEASE)
        with pytest.raises(NotOwner):
            await store.update("s", "p1", "PREFILLED")  # the prefill worker no longer owns it
        assert (await store.adopt("s", "d2", LEASE, expected_owner="d1")).owner == "d2"
        assert (await store.adopt("s", "d3", LEASE, force=True)).owner == "d3"
        with pytest.raises(SessionNotFound):
            await store.adopt("nope", "d1", LEASE)
        await store.update("s", "d3", "FINISHED")
        with pytest.raises(WrongState):
            await store.adopt("s", "d1", LEASE)
        assert await store.free("s", owner="d3") == 2
        assert (await store.audit()).ok

    run(body)


def test_adopt_with_extra_tokens_brings_the_first_decode_block():
    async def body(store: SessionStore) -> None:
        # block_size 4, 16 blocks. A prompt of 8 tokens fills 2 blocks: the first decode token needs a third.
        prompt = await store.allocate("s", 2, "p1", LEASE)
        await store.update("s", "p1", "PREFILLED", num_tokens=8, first_token=9)
        record = await store.adopt("s", "d1", LEASE, expected_state="PREFILLED", extra_tokens=1)
        assert record.block_table[:2] == tuple(prompt) and len(record.block_table) == 3
        assert record == await store.get("s") and (await store.stats()).free == 13
        # Room already there: nothing more is taken (a retry by the owner, or a prompt that ends inside a block).
        assert (await store.adopt("s", "d1", LEASE, extra_tokens=1)).block_table == record.block_table
        await store.allocate("t", 2, "p1", LEASE)
        await store.update("t", "p1", "PREFILLED", num_tokens=7)
        assert len((await store.adopt("t", "d1", LEASE, extra_tokens=1)).block_table) == 2
        # Too few free blocks: adopted all the same, table unchanged, nothing taken or evicted.
        await store.allocate("u", 4, "p1", LEASE)
        await store.update("u", "p1", None, num_tokens=16)
        await store.release("u", "p1")  # IDLE: evictable, but adopt's growth never evicts
        await store.allocate("v", 6, "p1", LEASE)
        await store.update("v", "p1", "PREFILLED", num_tokens=24)
        free = (await store.stats()).free
        record = await store.adopt("v", "d1", LEASE, extra_tokens=4 * free + 1)
        assert record.state is SessionState.DECODING and len(record.block_table) == 6
        assert (await store.stats()).free == free and (await store.get("u")).state is SessionState.IDLE
        with pytest.raises(ValueError):
            await store.adopt("v", "d1", LEASE, extra_tokens=-1)
        for sid in ("s", "t", "v"):
            await store.free(sid, owner="d1")
        assert (await store.audit()).ok

    run(body)


def test_a_handoff_is_announced_and_taken_by_its_own_request_only():
    async def body(store: SessionStore) -> None:
        heard: list[str] = []

        async def listen() -> None:
            async for sid in store.handoffs("d1"):  # no claim here: only ids of offered sessions
                heard.append(sid)

        listener = asyncio.create_task(listen())
        await asyncio.sleep(0.1)  # subscribed
        await store.allocate("s", 2, "p1", LEASE)
        with pytest.raises(WrongState):  # still PREFILLING: a decode worker waiting for it keeps waiting
            await store.adopt("s", "d1", LEASE, expected_state="PREFILLED", expected_request="r1")
        await store.update("s", "p1", None, num_tokens=3)  # progress is not a hand-off
        await store.update("s", "p1", "PREFILLED", num_tokens=5, first_token=9, request_id="r1")
        for _ in range(100):
            if heard:
                break
            await asyncio.sleep(0.01)
        listener.cancel()
        assert heard == ["s"]
        with pytest.raises(WrongState):  # another request on the same session id never takes it
            await store.adopt("s", "d2", LEASE, expected_state="PREFILLED", expected_request="r2")
        with pytest.raises(WrongState):  # nor frees it
            await store.free("s", expected_state="PREFILLED", expected_request="r2")
        record = await store.adopt("s", "d1", LEASE, expected_state="PREFILLED", expected_request="r1")
        assert record.owner == "d1" and record.request_id == "r1" and record.first_token == 9
        with pytest.raises(WrongState):  # the gateway's clean-up leaves an adopted hand-off to its decode worker
            await store.free("s", expected_state="PREFILLED", expected_request="r1")
        assert (await store.get("s")).owner == "d1"
        await store.allocate("t", 1, "p1", LEASE)
        await store.update("t", "p1", "PREFILLED", request_id="r3")
        assert await store.free("t", expected_state="PREFILLED", expected_request="r3") == 1  # nobody adopted it
        assert await store.free("t", expected_state="PREFILLED") == 0  # gone: idempotent
        await store.free("s", owner="d1")
        assert (await store.audit()).ok

    run(body)


def test_a_claimed_handoff_goes_to_the_claimer_in_prefills_update():
    """A decode worker's failed adopt leaves a claim; prefill's update to PREFILLED hands the session over in the same
    script (DECODING, the claimer's lease, the first decode block) and announces the record to the claimer only."""

    async def body(store: SessionStore) -> None:
        heard: list = []

        async def listen() -> None:
            async for item in store.handoffs("d1"):
                heard.append(item)

        listener = asyncio.create_task(listen())
        await asyncio.sleep(0.1)  # subscribed
        claim = dict(expected_state="PREFILLED", expected_request="r1", extra_tokens=1, claim_ms=LEASE)
        with pytest.raises(SessionNotFound):  # not even admitted yet: the claim is left all the same
            await store.adopt("s", "d1", LEASE, **claim)
        await store.allocate("s", 2, "p1", LEASE)  # 8 token slots
        with pytest.raises(WrongState):
            await store.adopt("s", "d1", LEASE, **claim)
        assert await store.update("s", "p1", None, num_tokens=3) is False  # progress is not a hand-off
        assert await store.update("s", "p1", "PREFILLED", num_tokens=8, first_token=9, request_id="r1") is True
        for _ in range(100):
            if heard:
                break
            await asyncio.sleep(0.01)
        record = await store.get("s")
        assert record.state is SessionState.DECODING and record.owner == "d1" and record.request_id == "r1"
        assert len(record.block_table) == 3  # the block of token 8 came with it
        assert heard == [record]  # the record itself, on d1's channel (no id on the prefilled channel)
        with pytest.raises(NotOwner):  # the former owner is fenced off at once
            await store.update("s", "p1", None, num_tokens=8)
        with pytest.raises(WrongState):  # another request never takes it
            await store.adopt("s", "d2", LEASE, expected_state="PREFILLED", expected_request="r2", claim_ms=LEASE)
        # the claimer's poll (its announcement lost) returns the session handed to it
        assert await store.adopt("s", "d1", LEASE, **claim) == record
        # a claim for another request is not served: that hand-off is offered to anyone, as without claims
        await store.allocate("t", 1, "p1", LEASE)
        with pytest.raises(WrongState):
            await store.adopt("t", "d1", LEASE, expected_state="PREFILLED", expected_request="old", claim_ms=LEASE)
        assert await store.update("t", "p1", "PREFILLED", num_tokens=2, request_id="new") is False
        assert (await store.get("t")).owner == "p1"
        listener.cancel()
        # a call that gives up frees what was handed to it, and only that
        assert await store.unclaim("t", "d1", "old") == 0 and (await store.get("t")) is not None
        assert await store.unclaim("s", "d1", "r1") == 3 and (await store.get("s")) is None
        await store.free("t")
        assert (await store.audit()).ok

    run(body)


def test_a_claim_survives_prefill_taking_an_idle_session_back():
    """Multi-turn: the decode call for turn 2 claims the session while it is still IDLE; prefill's adoption of it for
    the new prompt leaves the claim, and its update to PREFILLED hands the session over."""

    async def body(store: SessionStore) -> None:
        await store.allocate("s", 1, "p1", LEASE)
        await store.release("s", "p1")  # turn 1 done: IDLE
        with pytest.raises(WrongState):
            await store.adopt("s", "d1", LEASE, expected_state="PREFILLED", expected_request="turn2", claim_ms=LEASE)
        await store.adopt("s", "p1", LEASE, expected_state="IDLE", state="PREFILLING")
        await store.allocate("s", 1, "p1", LEASE, create=False)
        assert await store.update("s", "p1", "PREFILLED", num_tokens=6, request_id="turn2") is True
        record = await store.get("s")
        assert record.owner == "d1" and record.state is SessionState.DECODING
        await store.free("s", owner="d1")
        assert (await store.audit()).ok

    run(body)


def test_unclaim_withdraws_a_pending_claim():
    async def body(store: SessionStore) -> None:
        with pytest.raises(SessionNotFound):
            await store.adopt("s", "d1", LEASE, expected_state="PREFILLED", expected_request="r1", claim_ms=LEASE)
        assert await store.unclaim("s", "d1", "r1") == 0
        await store.allocate("s", 1, "p1", LEASE)
        assert await store.update("s", "p1", "PREFILLED", num_tokens=2, request_id="r1") is False  # offered instead
        assert (await store.get("s")).state is SessionState.PREFILLED
        await store.free("s")

    run(body)


def test_concurrent_adopters_of_a_handoff_one_wins():
    async def body(store: SessionStore) -> None:
        await store.allocate("s", 1, "p1", LEASE)
        await store.update("s", "p1", "PREFILLED")

        async def try_adopt(worker: str) -> str | None:
            try:
                return (await store.adopt("s", worker, LEASE, expected_state="PREFILLED")).owner
            except (WrongState, NotOwner):
                return None

        winners = [w for w in await asyncio.gather(*(try_adopt(f"d{i}") for i in range(20))) if w]
        assert len(winners) == 1 and (await store.get("s")).owner == winners[0]

    run(body)


def test_adopt_after_lease_expiry_fences_the_old_owner():
    async def body(store: SessionStore) -> None:
        blocks = await store.allocate("s", 2, "p1", LEASE)
        await store.update("s", "p1", "PREFILLED")
        await store.adopt("s", "d1", SHORT)
        with pytest.raises(NotOwner):
            await store.adopt("s", "d2", LEASE)
        await asyncio.sleep(SHORT * 2 / 1000)
        record = await store.adopt("s", "d2", LEASE, expected_state="DECODING")  # d1 died: d2 resumes
        assert record.owner == "d2" and record.block_table == tuple(blocks)
        # d1 wakes up: it can no longer touch the session.
        for stale in (
            store.update("s", "d1", None, num_tokens=3),
            store.allocate("s", 1, "d1", LEASE),
            store.free("s", owner="d1"),
            store.release("s", "d1"),
        ):
            with pytest.raises(NotOwner):
                await stale
        assert (await store.get("s")).block_table == tuple(blocks)
        assert await store.renew_leases("d1", LEASE) == 0
        await store.free("s", owner="d2")
        assert (await store.audit()).ok

    run(body)


# -- leases -------------------------------------------------------------------------------------------------------


def test_reclaim_expired_returns_the_blocks_of_a_vanished_owner():
    async def body(store: SessionStore) -> None:
        for sid in ("a", "b", "c"):
            await store.allocate(sid, 3, "dead", SHORT)
        await store.allocate("live", 2, "alive", LEASE)
        assert await store.reclaim_expired() == []
        await asyncio.sleep(SHORT * 2 / 1000)
        assert sorted(await store.reclaim_expired()) == ["a", "b", "c"]
        assert await store.reclaim_expired() == []
        assert (await store.stats()).free == 14
        assert await store.get("a") is None and await store.get("live") is not None
        report = await store.audit(allow_active=True)
        assert report.ok, report.message
        # now_ms lets a caller (or test) pick the instant.
        assert await store.reclaim_expired(now_ms=(await store.get("live")).lease_expires_ms) == ["live"]
        assert (await store.audit()).ok

    run(body)


def test_takeover_needs_the_owner_gone_from_the_registry_or_its_lease_expired():
    async def body(store: SessionStore) -> None:
        await store.register_worker("d1", "decode", "127.0.0.1:1", LEASE)
        blocks = await store.allocate("s", 3, "p1", LEASE)
        await store.update("s", "p1", "PREFILLED", num_tokens=9, request_id="r1")
        await store.adopt("s", "d1", LEASE, expected_state="PREFILLED")
        # d1 is alive (registered, lease valid): nobody takes its session, takeover or not
        for takeover in (False, True):
            with pytest.raises(NotOwner):
                await store.adopt("s", "d2", LEASE, takeover=takeover, expected_request="r1")
        await store.deregister_worker("d1")  # what its registry entry expiring looks like
        with pytest.raises(NotOwner):
            await store.adopt("s", "d2", LEASE)  # an ordinary adopt still waits for the lease
        with pytest.raises(WrongState):
            await store.adopt("s", "d2", LEASE, takeover=True, expected_request="r2")  # not this request's session
        record = await store.adopt("s", "d2", LEASE, takeover=True, expected_request="r1", cap_tokens=5)
        assert (record.owner, record.state, record.num_tokens) == ("d2", SessionState.DECODING, 5)
        assert record.block_table == tuple(blocks)
        # the cap only lowers; a resumer that knows more than the record leaves it
        await store.register_worker("d2", "decode", "127.0.0.1:2", SHORT)
        await asyncio.sleep(SHORT * 2 / 1000)
        assert (await store.adopt("s", "d3", LEASE, takeover=True, cap_tokens=8)).num_tokens == 5
        with pytest.raises(NotOwner):
            await store.update("s", "d2", None, num_tokens=6)  # the old owner is fenced off
        assert (await store.audit(allow_active=True)).ok

    run(body)


def test_allocate_and_prefill_adoption_record_the_request():
    async def body(store: SessionStore) -> None:
        await store.allocate("a", 1, "p1", LEASE, request_id="r1")
        assert (await store.get("a")).request_id == "r1"
        await store.allocate("a", 1, "p1", LEASE, create=False, request_id="r9")  # only a new session takes it
        assert (await store.get("a")).request_id == "r1"
        await store.update("a", "p1", None, num_tokens=2, tokens=[1, 2])
        await store.release("a", "p1")
        record = await store.adopt("a", "p2", LEASE, expected_state="IDLE", state="PREFILLING", set_request="r2")
        assert record.request_id == "r2" and record.state == SessionState.PREFILLING

    run(body)


def test_renew_leases_records_decode_progress():
    async def body(store: SessionStore) -> None:
        await store.allocate("s", 2, "p1", LEASE)  # 8 token slots
        await store.update("s", "p1", "PREFILLED", num_tokens=3)
        await store.adopt("s", "d1", LEASE)
        await store.allocate("t", 1, "p1", LEASE)  # PREFILLING: prefill's, not decode progress
        assert await store.renew_leases("d1", LEASE, {"s": 6, "t": 2}) == 1
        assert (await store.get("s")).num_tokens == 6 and (await store.get("t")).num_tokens == 0
        await store.renew_leases("d1", LEASE, {"s": 9})  # past its blocks: refused
        assert (await store.get("s")).num_tokens == 6
        await store.renew_leases("p1", LEASE, {"s": 7})  # not the owner
        assert (await store.get("s")).num_tokens == 6
        assert await store.owned_sessions("d1") == {"s"} and await store.owned_sessions("p1") == {"t"}

    run(body)


def test_renew_leases_keeps_working_sessions_but_not_handoffs():
    async def body(store: SessionStore) -> None:
        # Leases generous enough that a CPU starved by its host for a moment does not expire them between beats.
        await store.allocate("working", 2, "w", 400)
        await store.allocate("handoff", 2, "w", 400)
        await store.update("handoff", "w", "PREFILLED", lease_ms=SHORT)  # nobody adopts it: a cancelled request
        await store.allocate("other", 2, "x", LEASE)
        for _ in range(6):  # 6 x 100 ms > the 400 ms lease: only the heartbeats keep "working" alive
            await asyncio.sleep(0.1)
            assert await store.renew_leases("w", 400) == 1
        assert await store.reclaim_expired() == ["handoff"]
        assert await store.get("working") is not None
        assert (await store.stats()).free == 12

    run(body)


# -- idle sessions and LRU eviction -------------------------------------------------------------------------------


async def _idle_sessions(store: SessionStore, order: list[str], blocks: int) -> None:
    """Creates sessions and releases them in `order` (the first released is the least recently used)."""
    for sid in order:
        await store.allocate(sid, blocks, "d1", LEASE)
    for sid in order:
        await store.release(sid, "d1")
        await asyncio.sleep(0.002)


def test_release_makes_an_idle_session_that_can_be_resumed():
    async def body(store: SessionStore) -> None:
        blocks = await store.allocate("s", 2, "p1", LEASE)
        await store.update("s", "p1", "FINISHED", num_tokens=6)
        with pytest.raises(NotOwner):
            await store.release("s", "p2")
        await store.release("s", "p1")
        record = await store.get("s")
        assert (record.state, record.owner, record.lease_expires_ms) == (SessionState.IDLE, None, None)
        assert (await store.stats()).idle_sessions == 1
        assert await store.reclaim_expired(now_ms=2**52) == []  # idle sessions have no lease to expire
        report = await store.audit()
        assert report.ok, report.message
        # The next turn: a prefill worker adopts it and appends blocks for the new tokens.
        record = await store.adopt("s", "p2", LEASE, expected_state="IDLE", state="PREFILLING")
        assert (record.owner, record.num_tokens, record.block_table) == ("p2", 6, tuple(blocks))
        more = await store.allocate("s", 1, "p2", LEASE)
        assert (await store.get("s")).block_table == tuple(blocks + more)
        assert (await store.stats()).idle_sessions == 0

    run(body)


def test_evict_lru_frees_least_recently_used_first():
    async def body(store: SessionStore) -> None:
        await _idle_sessions(store, ["c", "a", "b"], blocks=4)  # LRU order c, a, b; 4 blocks free
        assert await store.evict_lru(4) == []  # enough already free
        assert await store.evict_lru(100) == []  # cannot be reached: keep the cache
        assert await store.evict_lru(10) == ["c", "a"]
        assert await store.get("b") is not None and await store.get("c") is None
        assert (await store.stats()).free == 12
        assert (await store.audit()).ok

    run(body)


def test_allocate_evicts_idle_sessions_only_when_allowed_and_enough():
    async def body(store: SessionStore) -> None:
        await _idle_sessions(store, ["x", "y", "z"], blocks=4)  # 4 blocks free
        with pytest.raises(OutOfBlocks) as exc:
            await store.allocate("new", 6, "p1", LEASE, evict=False)
        assert exc.value.free == 4
        with pytest.raises(OutOfBlocks) as exc:
            await store.allocate("new", 17, "p1", LEASE)  # even evicting all idle sessions gives 16
        assert (exc.value.needed, exc.value.free) == (17, 16)
        assert (await store.stats()).idle_sessions == 3  # nothing evicted by the failures
        blocks = await store.allocate("new", 10, "p1", LEASE)  # evicts x and y (LRU), not z
        assert len(set(blocks)) == 10
        assert await store.get("x") is None and await store.get("y") is None and await store.get("z") is not None
        stats = await store.stats()
        assert (stats.free, stats.idle_sessions, stats.active_sessions) == (2, 1, 1)
        report = await store.audit(allow_active=True)
        assert report.ok, report.message

    run(body)


# -- worker registry ----------------------------------------------------------------------------------------------


def test_worker_registry_expires_silent_workers():
    async def body(store: SessionStore) -> None:
        await store.register_worker("pre-1", "prefill", "10.0.0.1:50051", 100, {"model": "smollm2"})
        await store.register_worker("dec-1", "decode", "10.0.0.2:50052", LEASE)
        assert {w.worker_id for w in await store.list_workers()} == {"pre-1", "dec-1"}
        [dec] = await store.list_workers(role="decode")
        assert (dec.worker_id, dec.address, dec.load) == ("dec-1", "10.0.0.2:50052", {})
        assert (await store.list_workers(role="prefill"))[0].info == {"model": "smollm2"}
        assert await store.heartbeat("dec-1", LEASE, {"active": 3, "queued": 1})
        assert (await store.list_workers("decode"))[0].load == {"active": 3, "queued": 1}
        await asyncio.sleep(0.15)  # pre-1 stops heartbeating
        assert [w.worker_id for w in await store.list_workers()] == ["dec-1"]
        assert not await store.heartbeat("pre-1", 100)  # too late: it must register again
        assert await store.deregister_worker("dec-1")
        assert not await store.deregister_worker("dec-1")
        assert await store.list_workers() == []

    run(body)


# -- pool lifecycle -----------------------------------------------------------------------------------------------


def test_init_pool_is_restart_safe_and_refuses_another_geometry():
    async def body(store: SessionStore) -> None:
        blocks = await store.allocate("s", 3, "p1", LEASE)
        assert not await store.init_pool(16, 4)  # a restarted process: same pool, sessions kept
        assert (await store.get("s")).block_table == tuple(blocks)
        assert (await store.stats()).free == 13
        with pytest.raises(PoolGeometryMismatch, match="16 blocks x 4 tokens"):
            await store.init_pool(32, 4)
        with pytest.raises(PoolGeometryMismatch):
            await store.init_pool(16, 8)
        await store.register_worker("w", "decode", "addr", LEASE)
        assert await store.init_pool(32, 8, reset=True)
        assert await store.get("s") is None and await store.list_workers() == []
        stats = await store.stats()
        assert (stats.num_blocks, stats.block_size, stats.free) == (32, 8, 32)
        assert (await store.audit()).ok

    run(body)


# -- audit --------------------------------------------------------------------------------------------------------


def test_audit_catches_active_leaked_duplicated_and_dangling():
    async def body(store: SessionStore) -> None:
        r = raw(store)
        blocks = await store.allocate("s", 3, "d1", LEASE)
        report = await store.audit()
        assert not report.ok and "session s is still PREFILLING" in report.message
        assert (await store.audit(allow_active=True)).ok

        await store.update("s", "d1", "FINISHED")
        assert (await store.audit()).ok

        leaked = await r.rpop(store.key("free"))  # a block in no free-list and no session
        report = await store.audit()
        assert not report.ok and "leaked" in report.message and leaked in report.message, report.message
        await r.rpush(store.key("free"), leaked)
        assert (await store.audit()).ok

        await r.rpush(store.key("free"), blocks[1])  # a block both free and held
        report = await store.audit()
        assert not report.ok and f"block {blocks[1]} is held 2 times" in report.message, report.message
        await r.lrem(store.key("free"), -1, blocks[1])

        await r.rpush(store.key("session", "ghost", "blocks"), await r.lpop(store.key("free")))
        await r.zadd(store.key("leases"), {"phantom": 1})
        report = await store.audit()
        assert "dangling block table" in report.message and "'phantom' has no session record" in report.message
        assert await store.free("ghost") == 1  # free() also clears a dangling block table
        await r.zrem(store.key("leases"), "phantom")
        report = await store.audit()
        assert report.ok, report.message

    run(body)


def new_prefix() -> str:
    """A key prefix of its own, marked with this test run (tests/conftest.py checks the run leaves none behind)."""
    return f"kvtest{os.environ.get('KVRELAY_TEST_RUN', '')}-{uuid.uuid4().hex[:12]}"

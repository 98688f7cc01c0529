"""The session TTL against a real Redis: `expire_idle` frees IDLE sessions whose last use is older than the TTL (their
K/V blocks and their token ids), never a session a worker holds, and a session used again starts its TTL over."""

from __future__ import annotations

import asyncio

import pytest

from kvstore.sessions import SessionState, SessionStore
from tests.kvstore.test_sessions import _SKIP, LEASE, run

pytestmark = pytest.mark.skipif(_SKIP is not None, reason=_SKIP or "")

TTL_MS = 300  # tiny: the test waits it out


async def kept(store: SessionStore, sid: str, tokens: list[int]) -> None:
    """A turn that ends with its session kept: blocks, token ids recorded, IDLE (what the workers do)."""
    await store.allocate(sid, 1, "w", LEASE)
    await store.update(sid, "w", "FINISHED", num_tokens=len(tokens), tokens=tokens)
    await store.release(sid, "w")


def test_idle_sessions_older_than_the_ttl_are_freed_with_their_tokens():
    async def body(store: SessionStore) -> None:
        await kept(store, "old", [5, 6, 7])
        await kept(store, "touched", [1, 2])
        await store.allocate("busy", 2, "w", LEASE)  # a session a worker is working on: never expired
        assert await store.expire_idle(TTL_MS) == []  # nothing is that old yet
        await asyncio.sleep(TTL_MS / 1000 / 2)
        # the next turn of "touched" takes it back (IDLE -> PREFILLING) and keeps it again: its TTL starts over
        await store.adopt("touched", "w", LEASE, expected_state="IDLE", state="PREFILLING")
        await store.release("touched", "w")
        await asyncio.sleep(TTL_MS / 1000 / 2 + 0.05)

        assert await store.expire_idle(TTL_MS) == ["old"]
        assert await store.get("old") is None
        assert await store.get_tokens("old") == []  # its token ids left Redis with it
        assert (await store.get("touched")).state == SessionState.IDLE
        assert (await store.get("busy")).state == SessionState.PREFILLING
        assert (await store.stats()).free == 16 - 1 - 2
        assert (await store.audit(allow_active=True)).ok

        await asyncio.sleep(TTL_MS / 1000)
        assert await store.expire_idle(TTL_MS) == ["touched"]
        assert await store.expire_idle(TTL_MS) == []

    run(body)


def test_expire_idle_takes_a_bounded_batch_oldest_first():
    async def body(store: SessionStore) -> None:
        for sid in ("a", "b", "c"):
            await kept(store, sid, [1])
            await asyncio.sleep(0.002)
        # by a clock an hour ahead every one is past the TTL; at most `limit` go per call, least recently used first
        later = (await store.get("c")).updated_ms + 3_600_000
        assert await store.expire_idle(TTL_MS, limit=2, now_ms=later) == ["a", "b"]
        assert await store.expire_idle(TTL_MS, limit=2, now_ms=later) == ["c"]
        assert (await store.stats()).free == 16
        with pytest.raises(ValueError):
            await store.expire_idle(0)

    run(body)

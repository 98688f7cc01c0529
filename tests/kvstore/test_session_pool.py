"""SessionStore's Redis connections under load: bounded and blocking, so a burst of concurrent calls queues for a
connection instead of failing (redis-py 8's default pool raises MaxConnectionsError past 100 busy connections, which
failed a quarter of the streams of a gateway at ~200 concurrent ones). Needs a Redis at REDIS_URL."""

from __future__ import annotations

import asyncio
import uuid

import pytest
import redis.exceptions

from kvstore.sessions import SessionStore
from tests.kvstore.test_sessions import _SKIP, LEASE, REDIS_URL

pytestmark = pytest.mark.skipif(_SKIP is not None, reason=_SKIP or "")

CONCURRENT = 300


async def _store(**pool) -> SessionStore:
    store = await SessionStore.connect(REDIS_URL, prefix=f"kvrelay-test-{uuid.uuid4().hex[:12]}", **pool)
    await store.init_pool(CONCURRENT, 4)
    return store


async def _burst(store: SessionStore) -> None:
    """What a busy decode worker does at once: sessions allocated, read, grown, freed; heartbeats; a listener."""

    async def one(i: int) -> None:
        sid = f"s{i}"
        await store.allocate(sid, 1, "w", LEASE)
        assert (await store.get(sid)).block_table
        await store.update(sid, "w", None, num_tokens=2)
        await store.free(sid, owner="w")

    listener = asyncio.ensure_future(anext(store.handoffs("w")))  # a pub/sub connection held throughout
    try:
        await asyncio.wait_for(asyncio.gather(*(one(i) for i in range(CONCURRENT)), store.stats()), 60)
    finally:
        listener.cancel()
        await asyncio.gather(listener, return_exceptions=True)
    report = await store.audit()
    assert report.ok and (await store.stats()).free == CONCURRENT, report.message


@pytest.mark.parametrize("pool", [{}, {"max_connections": 4}], ids=["default-pool", "4-connections"])
def test_concurrent_calls_queue_for_a_connection_instead_of_failing(pool):
    async def main():
        store = await _store(**pool)
        try:
            await _burst(store)
            in_use = store._redis.connection_pool._in_use_connections
            assert len(in_use) <= store._redis.connection_pool.max_connections
        finally:
            await store.wipe()
            await store.close()

    asyncio.run(main())


def test_a_call_that_waits_too_long_for_a_connection_fails_with_a_redis_connection_error():
    """All connections busy past the timeout: a ConnectionError the servers answer as UNAVAILABLE (never a hang)."""

    async def main():
        store = await _store(max_connections=1, pool_timeout_s=0.2)
        held = await store._redis.connection_pool.get_connection()  # the one connection, taken
        try:
            with pytest.raises(redis.exceptions.ConnectionError, match="No connection available"):
                await store.stats()
        finally:
            await store._redis.connection_pool.release(held)
            await store.wipe()
            await store.close()

    asyncio.run(main())

"""The router leaves a worker it could not reach out of routing at once, and routes to it again only once the
registry shows a heartbeat it sent after that (against a scripted registry)."""

from __future__ import annotations

import asyncio

import pytest

from gateway.router import NoWorkers, Router
from kvstore.sessions import WorkerInfo


def worker(wid: str, heartbeat_ms: int, active: int = 0) -> WorkerInfo:
    return WorkerInfo(
        wid, "decode", f"127.0.0.1:{wid[-1]}", {}, {"active": active}, 0, heartbeat_ms, heartbeat_ms + 5000
    )


class Registry:
    def __init__(self) -> None:
        self.workers: list[WorkerInfo] = []

    async def list_workers(self, role=None) -> list[WorkerInfo]:
        return list(self.workers)


def test_an_unreachable_worker_is_routed_around_until_it_heartbeats_again():
    async def main():
        registry = Registry()
        registry.workers = [worker("d1", 1000), worker("d2", 1000, active=5)]
        router = Router(registry)
        assert (await router.pick("decode")).worker_id == "d1"  # least loaded
        router.unreachable(registry.workers[0])
        assert (await router.pick("decode")).worker_id == "d2"  # at once, before any registry read
        await router.refresh()  # the registry still lists d1 with the heartbeat it had: still out
        assert (await router.pick("decode")).worker_id == "d2"
        registry.workers[0] = worker("d1", 1500)  # it heartbeats again
        await router.refresh()
        assert (await router.pick("decode")).worker_id == "d1"
        # the only worker left fails: nothing to route to (the caller waits for one); once the registry drops the
        # dead worker, its mark goes with it
        registry.workers = [worker("d1", 1500)]
        await router.refresh()
        router.unreachable(registry.workers[0])
        with pytest.raises(NoWorkers):
            await router.pick("decode")
        registry.workers = []
        await router.refresh()
        assert router.down == {}
        registry.workers = [worker("d3", 2000)]  # a restarted worker registers under a new id: routed to at once
        assert (await router.pick("decode")).worker_id == "d3"

    asyncio.run(main())

"""Least-loaded routing over the workers registered in Redis, with one cached channel per worker address.

A worker a call could not reach (the call failed with UNAVAILABLE: the process died, or it stopped answering) is left
out of routing at once, without waiting for its registry entry to expire, and comes back when the registry shows a
heartbeat it sent after that (a restarted worker registers under a new id and is routed to as soon as it does).
"""

from __future__ import annotations

import asyncio
import logging
import time

import grpc

from kvrelay.rpc.grpc_server import internal_channel
from kvstore.sessions import SessionStore, WorkerInfo

REFRESH_S = 0.5  # registry re-read interval: cheap, and a dead worker drops out within a heartbeat TTL anyway

log = logging.getLogger("kvrelay.gateway")


class NoWorkers(Exception):
    pass


class Router:
    def __init__(self, store: SessionStore) -> None:
        self.store = store
        self.workers: dict[str, list[WorkerInfo]] = {}
        self.refreshed = 0.0
        self.in_flight: dict[str, int] = {}  # worker id -> requests this gateway has open there
        self.channels: dict[str, grpc.aio.Channel] = {}
        self._refreshing: asyncio.Task | None = None
        # Workers left out of routing: worker id -> (when it was marked, the heartbeat_ms the first registry read
        # begun after that found, None until then). A later heartbeat_ms proves a heartbeat after the failure.
        self.down: dict[str, tuple[float, int | None]] = {}

    async def refresh(self) -> None:
        started = time.monotonic()
        by_role: dict[str, list[WorkerInfo]] = {}
        listed = await self.store.list_workers()
        for w in listed:
            by_role.setdefault(w.role, []).append(w)
        beats = {w.worker_id: w.heartbeat_ms for w in listed}
        for wid, (marked, baseline) in list(self.down.items()):
            if wid not in beats:
                del self.down[wid]  # gone from the registry: no longer a candidate anyway
            elif baseline is None:
                if started > marked:
                    self.down[wid] = (marked, beats[wid])
            elif beats[wid] > baseline:
                log.info("worker %s heartbeats again: routing to it", wid)
                del self.down[wid]
        self.workers, self.refreshed = by_role, time.monotonic()

    def unreachable(self, worker: WorkerInfo) -> None:
        """A call to `worker` failed as if it were gone: route nothing more to it until it heartbeats again."""
        if worker.worker_id not in self.down:
            log.warning(
                "%s worker %s at %s is unreachable: routing around it", worker.role, worker.worker_id, worker.address
            )
        self.down[worker.worker_id] = (time.monotonic(), None)
        self._refresh_in_background()

    def _refresh_in_background(self) -> None:
        if self._refreshing is None or self._refreshing.done():
            self._refreshing = asyncio.get_running_loop().create_task(self._background_refresh())

    async def _background_refresh(self) -> None:
        try:
            await self.refresh()
        except Exception:  # Redis hiccup: keep routing on the list we have; the next pick tries again
            log.exception("worker registry refresh failed")

    def _candidates(self, role: str) -> list[WorkerInfo]:
        return [w for w in self.workers.get(role) or [] if w.worker_id not in self.down]

    async def pick(self, role: str) -> WorkerInfo:
        candidates = self._candidates(role)
        if not candidates:  # nothing to route to (the first request, or every worker gone): wait for a fresh list
            await self.refresh()
            candidates = self._candidates(role)
        elif time.monotonic() - self.refreshed > REFRESH_S:
            # Re-read in the background, not on the request's path: a Redis round trip here would sit between the
            # prefill reply and the Decode call. Routing uses a list at most one refresh older than before.
            self._refresh_in_background()
        if not candidates:
            raise NoWorkers(f"no {role} worker is registered and alive")

        # Reported load is up to a heartbeat old; this gateway's own open requests are exact. Use both.
        def load(w: WorkerInfo) -> float:
            return w.load.get("active", 0) + w.load.get("queued", 0) + self.in_flight.get(w.worker_id, 0)

        return min(candidates, key=load)

    def channel(self, address: str) -> grpc.aio.Channel:
        if address not in self.channels:
            self.channels[address] = internal_channel(address)  # sends the deployment secret
        return self.channels[address]

    def acquire(self, worker: WorkerInfo) -> None:
        self.in_flight[worker.worker_id] = self.in_flight.get(worker.worker_id, 0) + 1

    def release(self, worker: WorkerInfo) -> None:
        self.in_flight[worker.worker_id] -= 1

    async def close(self) -> None:
        if self._refreshing is not None:
            self._refreshing.cancel()
        for channel in self.channels.values():
            await channel.close()

"""Least-loaded routing over the workers registered in Redis, with one cached channel per worker address."""

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

    async def refresh(self) -> None:
        by_role: dict[str, list[WorkerInfo]] = {}
        for w in await self.store.list_workers():
            by_role.setdefault(w.role, []).append(w)
        self.workers, self.refreshed = by_role, time.monotonic()

    def _refresh_in_background(self) -> None:
        if self._refreshing is None or self._refreshing.done():
            self._refreshing = asyncio.get_running_loop().create_task(self._background_refresh())

    async def _background_refresh(self) -> None:
        try:
            await self.refresh()
        except Exception:  # Redis hiccup: keep routing on the list we have; the next pick tries again
            log.exception("worker registry refresh failed")

    async def pick(self, role: str) -> WorkerInfo:
        candidates = self.workers.get(role) or []
        if not candidates:  # nothing to route to (the first request, or every worker gone): wait for a fresh list
            await self.refresh()
            candidates = self.workers.get(role) or []
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

"""What prefill and decode workers tell each other for the split, through the deployment's Redis: decode publishes
its measured ITL, prefill its controller's rung (one key per worker, `{prefix}:split:{role}:{worker_id}`, set with a
short expiry: a worker that stops publishing, dead or stalled, drops out of the other side's view by itself); and
prefill announces each forward pass as it starts and ends on the channel `{prefix}:split:pass`, which decode workers
follow to pause for it (controller.py PauseCredit). A lost announcement costs one pause, never correctness: a pass's
start carries its expected length, past which decode stops waiting for its end."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from dataclasses import asdict, dataclass

from kvstore.sessions import SessionStore

EXPIRE_MS = 1500  # six ticks: a worker that missed that many is ignored


@dataclass(frozen=True)
class DecodeReport:
    itl_ms: float | None  # mean ITL over the last window; None: no step in it
    batch: int


@dataclass(frozen=True)
class PrefillReport:
    active: bool  # a prompt is queued or being computed
    level: int  # the controller's rung


class SplitBoard:
    def __init__(self, store: SessionStore) -> None:
        self.store = store

    def _key(self, role: str, worker_id: str) -> str:
        return self.store.key("split", role, worker_id)

    async def publish(self, role: str, worker_id: str, report: DecodeReport | PrefillReport) -> None:
        await self.store.redis.set(self._key(role, worker_id), json.dumps(asdict(report)), px=EXPIRE_MS)

    async def read(self, role: str) -> list[dict]:
        """The fresh reports of the live workers of `role`."""
        workers = await self.store.list_workers(role)
        if not workers:
            return []
        raw = await self.store.redis.mget([self._key(role, w.worker_id) for w in workers])
        return [json.loads(r) for r in raw if r]

    async def decode_itl_ms(self) -> float | None:
        """The worst ITL any decode worker measured (the split serves the slowest stream); None: none stepped."""
        itls = [r["itl_ms"] for r in await self.read("decode") if r.get("itl_ms") is not None]
        return max(itls) if itls else None

    def _channel(self) -> str:
        return self.store.key("split", "pass")

    async def announce_pass(self, worker_id: str, expected_ms: float | None) -> None:
        """A prefill pass starts (expected_ms: how long it should take) or, with None, ends."""
        message = f"start {worker_id} {expected_ms:.1f}" if expected_ms is not None else f"end {worker_id}"
        await self.store.redis.publish(self._channel(), message)

    async def passes(self) -> AsyncIterator[tuple[str, float | None]]:
        """(prefill worker id, expected ms of a pass that starts, or None when one ends), as announced."""
        pubsub = self.store.redis.pubsub(ignore_subscribe_messages=True)
        try:
            await pubsub.subscribe(self._channel())
            async for message in pubsub.listen():
                kind, worker, *rest = str(message["data"]).split()
                yield worker, (float(rest[0]) if kind == "start" and rest else None)
        finally:
            await pubsub.aclose()

    async def clear(self, role: str, worker_id: str) -> None:
        await self.store.redis.delete(self._key(role, worker_id))

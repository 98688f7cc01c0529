"""What prefill and decode workers tell each other for the split, through the deployment's Redis: decode publishes
its measured ITL, prefill its controller's decision. One key per worker, `{prefix}:split:{role}:{worker_id}`, set
with a short expiry: a worker that stops publishing (dead, stalled) drops out of the other side's view by itself."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass

from kvstore.sessions import SessionStore

EXPIRE_MS = 1500  # six ticks: a worker that missed that many is ignored


@dataclass(frozen=True)
class DecodeReport:
    itl_ms: float | None  # ITL p90 over the last window; None: no step in it
    batch: int


@dataclass(frozen=True)
class PrefillReport:
    active: bool  # a prompt is queued or being computed
    decode_yield_ms: float  # what decode should pause before each step while `active`
    level: int


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

    async def decode_yield_ms(self) -> float:
        """The longest pause an active prefill worker asks of decode (0: none asks)."""
        return max((r["decode_yield_ms"] for r in await self.read("prefill") if r.get("active")), default=0.0)

    async def clear(self, role: str, worker_id: str) -> None:
        await self.store.redis.delete(self._key(role, worker_id))

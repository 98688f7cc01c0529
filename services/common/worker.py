"""What prefill and decode workers share: attaching to the kvstore, registry heartbeats and lease upkeep, and their
life (kvrelay.rpc.lifecycle.serve).

Redis faults, as the heartbeat sees them:
- Redis unreachable (down, stopped): the heartbeat fails; health says NOT_SERVING, the worker stops acting after
  ACT_S (its step and forward-pass loops pause, as when it stalls), and resumes with the next heartbeat that lands.
  Past STORE_WAIT_S without one, the requests it holds end with UNAVAILABLE (`give_up_store`).
- Redis lost its state (restarted without persistence, flushed): the heartbeat finds the registry entry gone and the
  pool's epoch changed. The worker re-asserts what it holds (`held_sessions`, kvstore/lua/reassert.lua) while the
  re-created pool waits for it, and goes on; sessions refused (or a re-assert too late) are dropped unseen.
"""

from __future__ import annotations

import asyncio
import logging
import math
import os
import socket
import threading
import time
import uuid
from dataclasses import dataclass

import torch

from kvrelay.rpc.grpc_server import install_uvloop
from kvrelay.rpc.health import wait_healthy
from kvrelay.rpc.layout import fetch_layout
from kvrelay.rpc.lifecycle import Health, serve
from kvrelay.settings import WorkerSettings, parse
from kvstore.sessions import STORE_UNREACHABLE, HeldSession, RecoveryClosed, SessionStore
from services.common.attach import Attached, attach

HEARTBEAT_S = 1.0
WORKER_TTL_MS = 5_000  # a worker missing 5 heartbeats drops out of routing
LEASE_MS = 10_000  # a session whose owner stops renewing for this long is reclaimed
HANDOFF_LEASE_MS = 30_000  # a PREFILLED session nobody adopts within this is reclaimed (the gateway went away)
# A worker acts on its sessions (runs a forward pass or a step that writes into their blocks) only while its last
# successful heartbeat, which renewed its registry entry and its leases, is younger than this, by its own clock. Its
# registry entry lives WORKER_TTL_MS from that heartbeat, and a gateway may move its sessions to another worker once
# the entry is gone (kvstore/lua/adopt.lua, takeover): the 2 s between are for a pass admitted just before the fence
# to finish writing (a decode step or a prefill chunk takes well under that), so a worker whose heartbeats stop
# reaching Redis has stopped writing before anyone may take its sessions.
ACT_S = WORKER_TTL_MS / 1000 - 2.0
# One heartbeat (its Redis calls, retried inside) gives up after this: the next one tries again, and a worker cut off
# from Redis finds out within seconds (health NOT_SERVING, no acting after ACT_S).
BEAT_TIMEOUT_S = 2.5
# Requests held through a Redis outage pause; one longer than this ends them with UNAVAILABLE (give_up_store).
STORE_WAIT_S = 10.0
RECOVERY_POLL_S = 0.2  # after Redis lost its state: how often to look for the re-created pool, to re-assert in time

log = logging.getLogger("kvrelay.worker")


def set_cpu_threads(threads: int) -> None:
    """Workers computing on one CPU should not each take every core: while both compute, OpenMP threads of two
    processes spin on the same cores. Default model, 2 cores, one thread a process against two: 6 concurrent 20-token
    requests 2.75 s against 10.34 s; 64-token requests, TTFT median 323 against 688 ms at 4 concurrent (wall 6.7 against
    4.6 s) and 751 against 1355 ms at 8 (9.5 against 6.9 s), but one request alone 3.8 against 2.5 s (decode alone
    could use both cores). `kvrelay up` splits by default: prefill must not stall decode (or the reverse)."""
    if threads > 0:
        torch.set_num_threads(threads)


def sync_device(device: torch.device) -> None:
    """Writes into the pool are complete and visible to other processes before anyone is told about them."""
    if device.type == "cuda":
        torch.cuda.current_stream(device).synchronize()


class OwnStream:
    """Each worker does its GPU work on its own stream (so prefill and decode processes overlap under MPS / on AMD
    hardware queues); a no-op on the CPU.

    priority: decode's stream is created at the highest priority (-1 on CUDA and ROCm), prefill's at the default, so
    that when both processes have blocks waiting for SMs (under MPS, or on AMD's hardware queues), the block scheduler
    takes decode's first: a running prefill block is never preempted, but prefill's queue no longer delays a decode
    step by more than the blocks already running.
    """

    def __init__(self, device: torch.device, priority: int = 0) -> None:
        self.stream = torch.cuda.Stream(device, priority=priority) if device.type == "cuda" else None
        # One forward pass at a time per process: in a colocated worker, prefill and decode loops share this object,
        # so a prefill chunk and a decode step alternate instead of racing on the same stream.
        self.lock = threading.Lock()

    def run(self, fn, *args):
        with self.lock:
            if self.stream is None:
                return fn(*args)
            with torch.cuda.stream(self.stream):
                return fn(*args)


class Worker:
    """Attach to the kvstore, register in Redis, heartbeat, renew leases of owned sessions, reclaim dead ones."""

    role = "worker"

    def __init__(self, settings: WorkerSettings) -> None:
        self.settings = settings
        host_pid = f"{socket.gethostname()}-{os.getpid()}"
        self.worker_id = settings.worker_id or f"{self.role}-{host_pid}-{uuid.uuid4().hex[:6]}"
        self.address = f"{settings.host}:{settings.port}"
        self.store: SessionStore | None = None
        self.attached: Attached | None = None
        self.stopping = asyncio.Event()
        # time.monotonic() until which this worker may act on its sessions (ACT_S); no fence before it registers
        self.acting_until = math.inf
        self.health = Health()
        self.info: dict = {}  # static registry info (register)
        self.epoch = ""  # the epoch of the pool this worker's sessions live in (kvstore/sessions.py PoolState)
        self.store_ok_at = time.monotonic()  # the last heartbeat that reached Redis and allowed acting
        self.waiting_for_pool = False

    def load(self) -> dict:
        return {}

    def pause_acting(self) -> None:
        """Stop acting until the next heartbeat that reaches Redis (and, after Redis lost its state, re-asserts)."""
        self.acting_until = 0.0

    async def store_lost(self) -> bool:
        """Whether Redis lost its state since this worker's sessions were known there (the pool's epoch changed or
        the pool is gone): then a session missing from Redis is not lost, only not re-asserted yet. Pauses acting."""
        lost = (await self.store.pool_state()).epoch != self.epoch
        if lost:
            self.pause_acting()
        return lost

    def may_act(self) -> bool:
        """Whether this worker may still write into its sessions' blocks: its registry entry and leases are
        certainly alive, so nobody may have taken its sessions over (see ACT_S)."""
        return time.monotonic() < self.acting_until

    def progress(self) -> dict[str, int]:
        """Session id -> tokens whose K/V are written, recorded with each heartbeat (decode workers)."""
        return {}

    def drop_lost(self, owned: set[str]) -> None:
        """After a stall that outlived the registry entry: forget (never free) the sessions not in `owned`, which
        another worker took over or a lease expiry reclaimed meanwhile."""

    def prepare(self) -> None:
        """Runs once on the worker's stream after attaching (decode captures its graphs here)."""

    def held_sessions(self) -> list[HeldSession]:
        """The sessions this worker holds and works on, as it knows them: what it re-asserts after Redis lost its
        state. Every other session of its own it drops (drop_lost) once the re-assert is done."""
        return []

    def give_up_store(self, why: str) -> None:
        """Redis has been away for STORE_WAIT_S: end the requests this worker holds with UNAVAILABLE saying `why`."""

    async def heartbeat_loop(self) -> None:
        away_logged = False
        while not self.stopping.is_set():
            pause = HEARTBEAT_S
            try:
                if await asyncio.wait_for(self._beat(), BEAT_TIMEOUT_S):
                    self.store_ok_at = time.monotonic()
                    if away_logged:
                        log.warning("the session store answers again (%s)", self.store.url)
                        away_logged = False
                    await self.health.dependency(True)
                else:
                    pause = RECOVERY_POLL_S
            except Exception as exc:  # Redis away or failing: keep serving what can be, try again next beat
                if not away_logged:
                    log.warning("heartbeat failed (%s: %s); NOT_SERVING until Redis answers", type(exc).__name__, exc)
                    away_logged = True
                await self.health.dependency(False, f"{STORE_UNREACHABLE} at {self.store.url}")
            away = time.monotonic() - self.store_ok_at
            if away > STORE_WAIT_S:
                self.give_up_store(f"{STORE_UNREACHABLE} at {self.store.url} for {away:.0f} s; retry")
            try:
                await asyncio.wait_for(self.stopping.wait(), pause)
            except TimeoutError:
                pass

    async def _beat(self) -> bool:
        """One heartbeat: registry, leases, reclaims. False while this worker may not act yet (Redis lost its state
        and the pool is not re-created: it looks again in RECOVERY_POLL_S)."""
        sent = time.monotonic()
        if await self.store.heartbeat(self.worker_id, WORKER_TTL_MS, self.load()):
            await self.store.renew_leases(self.worker_id, LEASE_MS, self.progress())
        elif not await self._entry_missing():
            return False
        self.acting_until = sent + ACT_S
        reclaimed = await self.store.reclaim_expired()
        if reclaimed:
            log.warning("reclaimed %d expired sessions: %s", len(reclaimed), reclaimed[:5])
        if self.settings.session_ttl > 0:  # idle sessions past their TTL: their K/V and token ids go
            expired = await self.store.expire_idle(max(1, round(self.settings.session_ttl * 1000)))
            if expired:
                log.info("freed %d idle sessions older than %g s", len(expired), self.settings.session_ttl)
        return True

    async def _entry_missing(self) -> bool:
        """Our registry entry is gone: we stalled past its TTL, or Redis lost its state. Stop acting; True once we may
        act again."""
        self.pause_acting()
        pool = await self.store.pool_state()
        if pool.epoch == self.epoch:
            # We missed our TTL (a long stall): another worker may have taken our sessions meanwhile. Announce
            # ourselves again (or routers never see us), renew what we still own (from then on nobody may take it),
            # and only then find out what we lost.
            log.warning("%s missed its registry TTL; registering again", self.worker_id)
            await self.store.register_worker(self.worker_id, self.role, self.address, WORKER_TTL_MS, self.info)
            await self.store.renew_leases(self.worker_id, LEASE_MS)
            self.drop_lost(await self.store.owned_sessions(self.worker_id))
            return True
        if not pool.epoch:  # Redis lost its state; the kvstore re-creates the pool within a second
            if not self.waiting_for_pool:
                log.warning("the session store lost its state (Redis restarted or flushed); waiting for the pool")
                self.waiting_for_pool = True
            await self.health.dependency(False, "the session store lost its state; re-creating the pool")
            return False
        self.waiting_for_pool = False
        held = self.held_sessions()
        try:
            refused = await self.store.reassert(
                self.worker_id, self.role, self.address, WORKER_TTL_MS, LEASE_MS, held, self.info
            )
        except RecoveryClosed:  # too late: the free-list was rebuilt without our blocks; they are not ours
            await self.store.register_worker(self.worker_id, self.role, self.address, WORKER_TTL_MS, self.info)
            refused = [h.session_id for h in held]
        self.epoch = pool.epoch
        self.drop_lost({h.session_id for h in held} - set(refused))
        log.warning(
            "the session store lost its state: %s re-asserted %d session(s) into the re-created pool (%d refused)",
            self.worker_id,
            len(held) - len(refused),
            len(refused),
        )
        return True

    def adopt_runtime(self, runtime: Runtime) -> None:
        """Take the attached model, the stream and the Redis store this worker computes with (its own, or shared with
        the other role of a colocated process)."""
        self.attached, self.gpu, self.store = runtime.attached, runtime.gpu, runtime.store

    async def register(self, stop: asyncio.Event, info: dict | None = None) -> list[asyncio.Task]:
        """Announce this worker in the registry and start its heartbeat; returns the heartbeat task."""
        self.stopping = stop
        self.info = info or {}
        sent = time.monotonic()
        self.epoch = (await self.store.pool_state()).epoch
        await self.store.register_worker(self.worker_id, self.role, self.address, WORKER_TTL_MS, self.info)
        self.acting_until = sent + ACT_S
        self.store_ok_at = time.monotonic()
        return [asyncio.create_task(self.heartbeat_loop())]

    async def deregister(self) -> None:
        if self.store is not None:
            await self.store.deregister_worker(self.worker_id)

    def loops(self) -> list:
        """The coroutines this worker runs beside its gRPC handlers."""
        return []

    async def run(self, servicers: list, service_names: list[str]) -> None:
        tasks: list[asyncio.Task] = []
        runtimes: list[Runtime] = []

        async def startup(stop: asyncio.Event) -> None:
            runtime = await Runtime.start(self.settings, self.role, priority=-1 if self.role == "decode" else 0)
            runtimes.append(runtime)
            self.adopt_runtime(runtime)
            await asyncio.to_thread(self.gpu.run, self.prepare)
            tasks.extend(await self.register(stop))
            tasks.extend(asyncio.create_task(loop) for loop in self.loops())

        async def shutdown() -> None:
            for task in tasks:
                task.cancel()
            await self.deregister()
            for runtime in runtimes:
                await runtime.close()

        host, port = self.settings.host, self.settings.port
        await serve(servicers, service_names, host, port, startup, shutdown, health=self.health)


@dataclass
class Runtime:
    """What a worker process computes with: the model and pool mapped from the kvstore, its stream, its Redis store."""

    attached: Attached
    gpu: OwnStream
    store: SessionStore

    @classmethod
    async def start(cls, settings: WorkerSettings, name: str, priority: int = 0) -> Runtime:
        await wait_healthy(settings.kvstore, "kvrelay.internal.v1.KVStore", timeout_s=600)
        layout = await fetch_layout(settings.kvstore)
        t0 = time.perf_counter()
        attached = await asyncio.to_thread(attach, layout, settings.max_model_len)
        log.info("%s attached to %s in %.2fs", name, layout.model_dir, time.perf_counter() - t0)
        gpu = OwnStream(attached.runner.device, priority=priority)
        store = await SessionStore.connect(settings.redis_url, settings.name)
        return cls(attached, gpu, store)

    async def close(self) -> None:
        await self.store.close()


def main_for(worker_cls, settings_cls: type[WorkerSettings]) -> None:
    settings = parse(settings_cls, description=worker_cls.__doc__.strip().splitlines()[0])
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    set_cpu_threads(settings.cpu_threads)
    install_uvloop()
    worker_cls(settings).main_sync()

"""What prefill and decode workers share: attaching to the kvstore, registry heartbeats and lease upkeep, and their
life (kvrelay.rpc.lifecycle.serve)."""

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
from kvrelay.rpc.lifecycle import serve
from kvrelay.settings import WorkerSettings, parse
from kvstore.sessions import SessionStore
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

    def load(self) -> dict:
        return {}

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

    async def heartbeat_loop(self) -> None:
        while not self.stopping.is_set():
            try:
                sent = time.monotonic()
                if not await self.store.heartbeat(self.worker_id, WORKER_TTL_MS, self.load()):
                    # We missed our TTL (a long stall): another worker may have taken our sessions meanwhile. Stop
                    # acting, announce ourselves again (or routers never see us), renew what we still own (from then
                    # on nobody may take it), and only then find out what we lost.
                    self.acting_until = 0.0
                    log.warning("%s missed its registry TTL; registering again", self.worker_id)
                    await self.store.register_worker(self.worker_id, self.role, self.address, WORKER_TTL_MS, {})
                    await self.store.renew_leases(self.worker_id, LEASE_MS)
                    self.drop_lost(await self.store.owned_sessions(self.worker_id))
                else:
                    await self.store.renew_leases(self.worker_id, LEASE_MS, self.progress())
                self.acting_until = sent + ACT_S
                reclaimed = await self.store.reclaim_expired()
                if reclaimed:
                    log.warning("reclaimed %d expired sessions: %s", len(reclaimed), reclaimed[:5])
                if self.settings.session_ttl > 0:  # idle sessions past their TTL: their K/V and token ids go
                    expired = await self.store.expire_idle(max(1, round(self.settings.session_ttl * 1000)))
                    if expired:
                        log.info("freed %d idle sessions older than %g s", len(expired), self.settings.session_ttl)
            except Exception:  # Redis hiccup: keep serving, try again next beat
                log.exception("heartbeat failed")
            try:
                await asyncio.wait_for(self.stopping.wait(), HEARTBEAT_S)
            except TimeoutError:
                pass

    def adopt_runtime(self, runtime: Runtime) -> None:
        """Take the attached model, the stream and the Redis store this worker computes with (its own, or shared with
        the other role of a colocated process)."""
        self.attached, self.gpu, self.store = runtime.attached, runtime.gpu, runtime.store

    async def register(self, stop: asyncio.Event, info: dict | None = None) -> list[asyncio.Task]:
        """Announce this worker in the registry and start its heartbeat; returns the heartbeat task."""
        self.stopping = stop
        sent = time.monotonic()
        await self.store.register_worker(self.worker_id, self.role, self.address, WORKER_TTL_MS, info or {})
        self.acting_until = sent + ACT_S
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
        await serve(servicers, service_names, host, port, startup, shutdown)


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

"""What prefill and decode workers share: arguments, attaching to the kvstore, registry heartbeats and lease upkeep."""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import socket
import threading
import time
import uuid
from collections.abc import Callable

import torch

from kvrelay.rpc.grpc_server import install_uvloop, set_serving, start_server, stop_server
from kvrelay.rpc.health import wait_healthy
from kvrelay.rpc.lifecycle import stop_event_on_signals, unless_stopped
from kvstore.sessions import SessionStore
from services.common.attach import Attached, attach, fetch_layout

HEARTBEAT_S = 1.0
WORKER_TTL_MS = 5_000  # a worker missing 5 heartbeats drops out of routing
LEASE_MS = 10_000  # a session whose owner stops renewing for this long is reclaimed
HANDOFF_LEASE_MS = 30_000  # a PREFILLED session nobody adopts within this is reclaimed (the gateway went away)

log = logging.getLogger("kvrelay.worker")


def worker_args(description: str, default_port: int) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--kvstore", default="127.0.0.1:50070", help="kvstore address")
    parser.add_argument("--redis-url", default=os.environ.get("REDIS_URL", "redis://127.0.0.1:6379/0"))
    parser.add_argument("--name", default="kvrelay", help="deployment name: the Redis key prefix")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=default_port)
    parser.add_argument("--worker-id", default=None)
    parser.add_argument("--max-model-len", type=int, default=None)
    parser.add_argument("--max-batch-tokens", type=int, default=2048, help="token budget of one forward pass")
    parser.add_argument(
        "--cpu-threads",
        type=int,
        default=int(os.environ.get("KVRELAY_CPU_THREADS", "0")),
        help="torch's CPU threads in this process (0: torch's default, every core; `kvrelay up` splits the cores)",
    )
    return parser


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

    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.worker_id = args.worker_id or f"{self.role}-{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:6]}"
        self.address = f"{args.host}:{args.port}"
        self.store: SessionStore | None = None
        self.attached: Attached | None = None
        self.stopping = asyncio.Event()

    def load(self) -> dict:
        return {}

    def prepare(self) -> None:
        """Runs once on the worker's stream after attaching (decode captures its graphs here)."""

    async def heartbeat_loop(self) -> None:
        while not self.stopping.is_set():
            try:
                if not await self.store.heartbeat(self.worker_id, WORKER_TTL_MS, self.load()):
                    # we missed our TTL (a long stall): announce ourselves again or routers never see us
                    await self.store.register_worker(self.worker_id, self.role, self.address, WORKER_TTL_MS, {})
                await self.store.renew_leases(self.worker_id, LEASE_MS)
                reclaimed = await self.store.reclaim_expired()
                if reclaimed:
                    log.warning("reclaimed %d expired sessions: %s", len(reclaimed), reclaimed[:5])
            except Exception:  # Redis hiccup: keep serving, try again next beat
                log.exception("heartbeat failed")
            try:
                await asyncio.wait_for(self.stopping.wait(), HEARTBEAT_S)
            except TimeoutError:
                pass

    async def run(self, servicers: list, service_names: list[str], start_loops: Callable[[], list]) -> None:
        server, health = await start_server(servicers, service_names, self.args.port, self.args.host)
        self.stopping = stop_event_on_signals()
        tasks = []

        async def startup() -> None:
            await wait_healthy(self.args.kvstore, "kvrelay.internal.v1.KVStore", timeout_s=600)
            layout = await fetch_layout(self.args.kvstore)
            t0 = time.perf_counter()
            self.attached = await asyncio.to_thread(attach, layout, self.args.max_model_len)
            self.gpu = OwnStream(self.attached.runner.device, priority=-1 if self.role == "decode" else 0)
            await asyncio.to_thread(self.gpu.run, self.prepare)
            log.info("%s attached to %s in %.2fs", self.worker_id, layout.model_dir, time.perf_counter() - t0)
            self.store = await SessionStore.connect(self.args.redis_url, self.args.name)
            await self.store.register_worker(self.worker_id, self.role, self.address, WORKER_TTL_MS, {})
            tasks.extend([asyncio.create_task(self.heartbeat_loop()), *start_loops()])
            await set_serving(health, service_names, True)

        try:
            if await unless_stopped(startup(), self.stopping):
                await self.stopping.wait()
        finally:
            await stop_server(server, health, grace_s=2.0)
            for task in tasks:
                task.cancel()
            if self.store is not None:
                await self.store.deregister_worker(self.worker_id)
                await self.store.close()


def main_for(worker_cls, description: str, default_port: int, extra_args=None) -> None:
    parser = worker_args(description, default_port)
    if extra_args is not None:
        extra_args(parser)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    set_cpu_threads(args.cpu_threads)
    install_uvloop()
    worker_cls(args).main_sync()

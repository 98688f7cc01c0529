"""The one lifecycle of every kvrelay process (gateway, kvstore, prefill, decode, colocated): `serve()`.

Start-up can be interrupted by a stop signal: a process told to stop while it still waits for its dependencies
(kvstore not up, model loading) must exit promptly instead of finishing its start first."""

from __future__ import annotations

import asyncio
import signal
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field

import grpc

from kvrelay.rpc.grpc_server import (
    MAX_MESSAGE_BYTES,
    AddServicerFn,
    set_serving,
    start_server,
    stop_server,
)


@dataclass
class Health:
    """What a process's own loops report about a dependency it cannot serve without (Redis): SERVING only while the
    process has started, is not stopping, and the dependency is there. Bound by `serve`; before that it only records.
    """

    dependency_ok: bool = True
    why: str = ""  # why not, while not dependency_ok
    _servicer: object = None
    _names: Sequence[str] = field(default_factory=tuple)
    _serving: bool = False  # started and not stopping

    async def dependency(self, ok: bool, why: str = "") -> None:
        changed = ok != self.dependency_ok
        self.dependency_ok, self.why = ok, "" if ok else why
        if changed and self._serving:
            await set_serving(self._servicer, self._names, ok)

    async def _bind(self, servicer: object, names: Sequence[str], serving: bool) -> None:
        self._servicer, self._names, self._serving = servicer, names, serving
        await set_serving(servicer, names, serving and self.dependency_ok)


def stop_event_on_signals() -> asyncio.Event:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    return stop


async def unless_stopped(startup: Awaitable, stop: asyncio.Event) -> bool:
    """Run startup to completion (True) unless stop is set first (False; startup is cancelled)."""
    task = asyncio.ensure_future(startup)
    stopper = asyncio.ensure_future(stop.wait())
    done, _ = await asyncio.wait({task, stopper}, return_when=asyncio.FIRST_COMPLETED)
    if task in done:
        stopper.cancel()
        task.result()  # re-raise a failed start
        return True
    task.cancel()
    return False


async def serve(
    servicers: Sequence[tuple[AddServicerFn, object]],
    service_names: Sequence[str],
    host: str,
    port: int,
    startup: Callable[[asyncio.Event], Awaitable[None]],
    shutdown: Callable[[], Awaitable[None]] | None = None,
    *,
    grace_s: float = 2.0,
    max_receive_bytes: int = MAX_MESSAGE_BYTES,
    interceptors: Sequence[grpc.aio.ServerInterceptor] | None = None,
    tls: grpc.ServerCredentials | None = None,
    unix_socket: str | None = None,
    health: Health | None = None,
) -> None:
    """The life of every kvrelay process, in order:

    1. listen at once, health NOT_SERVING (a process is reachable long before its model is loaded);
    2. `startup(stop)`: wait for dependencies, load, register; a SIGTERM/SIGINT meanwhile cancels it;
    3. health SERVING, until a stop signal;
    4. drain: health NOT_SERVING, running calls get grace_s to finish (`stop_server`);
    5. `shutdown()`: cancel loops, deregister, close connections, free memory; it runs even when startup failed.

    `stop` is the event the signals set; a process's own loops watch it too. interceptors, tls, unix_socket: see
    `start_server` (None: an internal service, which wants the deployment secret). health: lets the process's loops
    say NOT_SERVING while a dependency is away (step 3 then reports SERVING only while it is there).
    """
    server, servicer = await start_server(
        servicers,
        service_names,
        port,
        host,
        max_receive_bytes=max_receive_bytes,
        interceptors=interceptors,
        tls=tls,
        unix_socket=unix_socket,
    )
    stop = stop_event_on_signals()
    health = health or Health()
    try:
        if await unless_stopped(startup(stop), stop):
            await health._bind(servicer, service_names, True)
            await stop.wait()
    finally:
        health._serving = False  # draining: a dependency coming back must not say SERVING again
        await stop_server(server, servicer, grace_s=grace_s)
        if shutdown is not None:
            await shutdown()

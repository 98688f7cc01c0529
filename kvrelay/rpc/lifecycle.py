"""The one lifecycle of every kvrelay process (gateway, kvstore, prefill, decode, colocated): `serve()`.

Start-up can be interrupted by a stop signal: a process told to stop while it still waits for its dependencies
(kvstore not up, model loading) must exit promptly instead of finishing its start first."""

from __future__ import annotations

import asyncio
import signal
from collections.abc import Awaitable, Callable, Sequence

import grpc

from kvrelay.rpc.grpc_server import (
    MAX_MESSAGE_BYTES,
    AddServicerFn,
    set_serving,
    start_server,
    stop_server,
)


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
) -> None:
    """The life of every kvrelay process, in order:

    1. listen at once, health NOT_SERVING (a process is reachable long before its model is loaded);
    2. `startup(stop)`: wait for dependencies, load, register; a SIGTERM/SIGINT meanwhile cancels it;
    3. health SERVING, until a stop signal;
    4. drain: health NOT_SERVING, running calls get grace_s to finish (`stop_server`);
    5. `shutdown()`: cancel loops, deregister, close connections, free memory; it runs even when startup failed.

    `stop` is the event the signals set; a process's own loops watch it too. interceptors, tls, unix_socket: see
    `start_server` (None: an internal service, which wants the deployment secret).
    """
    server, health = await start_server(
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
    try:
        if await unless_stopped(startup(stop), stop):
            await set_serving(health, service_names, True)
            await stop.wait()
    finally:
        await stop_server(server, health, grace_s=grace_s)
        if shutdown is not None:
            await shutdown()

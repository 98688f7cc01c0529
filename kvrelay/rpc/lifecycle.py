"""Start-up that a stop signal can interrupt: a process told to stop while it still waits for its dependencies
(kvstore not up, model loading) must exit promptly instead of finishing its start first."""

from __future__ import annotations

import asyncio
import signal
from collections.abc import Awaitable


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

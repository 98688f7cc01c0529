"""Client side of the standard gRPC health service: wait until a kvrelay process reports SERVING.

Used by the launcher and tests (start a worker, wait for it) and by the gateway before it routes to a new worker.
"""

from __future__ import annotations

import asyncio
import time

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from kvrelay.rpc.grpc_server import channel_options

# Poll fast at first (a process that is already up answers at once), then back off so that many waiters on a slow
# model load do not flood it.
FIRST_POLL_S = 0.05
MAX_POLL_S = 0.5
# One Check must not block longer than this, so the overall timeout is kept even against a hung server.
CHECK_TIMEOUT_S = 1.0


async def wait_healthy(address: str, service: str = "", timeout_s: float = 60.0) -> None:
    """Return once `address` ("host:port") reports SERVING for `service` ("" = the process as a whole).

    Raises TimeoutError after timeout_s seconds, naming the address, the service and the last thing seen (a status
    such as NOT_SERVING, or the gRPC error, e.g. UNAVAILABLE: connection refused).
    """
    deadline = time.monotonic() + timeout_s
    poll_s = FIRST_POLL_S
    last_seen = "no answer yet"
    async with grpc.aio.insecure_channel(address, options=channel_options()) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                break
            try:
                reply = await stub.Check(
                    health_pb2.HealthCheckRequest(service=service), timeout=min(CHECK_TIMEOUT_S, remaining)
                )
            except grpc.aio.AioRpcError as exc:
                # UNAVAILABLE: not listening yet; NOT_FOUND: service not registered yet. Both may change: keep polling.
                last_seen = f"{exc.code().name}: {exc.details()}"
            else:
                if reply.status == health_pb2.HealthCheckResponse.SERVING:
                    return
                last_seen = health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                break
            await asyncio.sleep(min(poll_s, remaining))
            poll_s = min(poll_s * 2, MAX_POLL_S)
    what = f"service {service!r}" if service else "the overall status"
    raise TimeoutError(f"{address} did not report SERVING for {what} within {timeout_s:g} s (last seen: {last_seen})")

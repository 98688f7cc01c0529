"""The gRPC server bootstrap every kvrelay process shares (gateway, prefill, decode, kvstore).

One place decides the transport policy: message size limits, keepalive on both sides, the standard health service and
server reflection, and who may call (kvrelay/rpc/auth.py): every server is an internal service that wants the
deployment secret unless it passes its own gate (the public gateway: API keys, optionally TLS), and every channel to an
internal service comes from `internal_channel`, which sends the secret. The guard (kvrelay/rpc/guard.py) gives every
failure a real status code, never UNKNOWN. A service module only writes its servicer and calls `start_server`.

Keepalive policy. A long call (a Decode stream of thousands of tokens, a Prefill waiting in a busy queue) sees quiet
periods, and keepalive pings are what notice a peer that vanished without closing its connection. But a server that
judges a client's pings too frequent answers with GOAWAY ENHANCE_YOUR_CALM ("too_many_pings") and that closes the
connection, cancelling every stream multiplexed on it at once. So the two sides are set together:

- clients ping every 30 s (CLIENT_KEEPALIVE_TIME_MS), also without active calls and without limit on pings between
  data frames, and give up on a peer after 10 s without an ack;
- servers accept pings as often as every 10 s (a 3x margin over the clients) and never count "strikes", so even a
  foreign client with a more eager policy cannot make them send GOAWAY;
- servers ping idle clients every 60 s themselves, so work of a client that disappeared is found and aborted;
- no max_connection_age / max_connection_idle: both end connections with GOAWAY, and a stream alive at the end of
  the grace period is cancelled.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Sequence
from typing import Any

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from kvrelay.rpc.auth import internal_client_interceptors, internal_server_interceptors

# A `add_XServicer_to_server` function from a generated *_pb2_grpc module, and the servicer it registers.
AddServicerFn = Callable[[Any, grpc.aio.Server], None]
HealthServicer = health.aio.HealthServicer

# The largest message kvrelay sends is a Layout with a few thousand TensorSlices or a CompleteResponse with logprobs
# of a long output (~24 bytes per alternative); 64 MiB leaves room for both. gRPC's default receive limit is 4 MiB.
MAX_MESSAGE_BYTES = 64 * 1024 * 1024

CLIENT_KEEPALIVE_TIME_MS = 30_000
CLIENT_KEEPALIVE_TIMEOUT_MS = 10_000
SERVER_KEEPALIVE_TIME_MS = 60_000
SERVER_KEEPALIVE_TIMEOUT_MS = 20_000
# The smallest ping interval a server tolerates; must stay below CLIENT_KEEPALIVE_TIME_MS.
SERVER_MIN_PING_INTERVAL_MS = 10_000


def server_options(max_receive_bytes: int = MAX_MESSAGE_BYTES) -> list[tuple[str, int]]:
    """Channel arguments of every kvrelay server (see the module docstring for the keepalive reasoning).

    max_receive_bytes: the public gateway takes a smaller limit; gRPC itself refuses larger requests.
    """
    return [
        ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
        ("grpc.max_receive_message_length", max_receive_bytes),
        # The server's own pings: find clients that vanished without a FIN (their streams are then cancelled).
        ("grpc.keepalive_time_ms", SERVER_KEEPALIVE_TIME_MS),
        ("grpc.keepalive_timeout_ms", SERVER_KEEPALIVE_TIMEOUT_MS),
        # Clients keep idle channels warm (the gateway's channels to workers): let them ping with no call open.
        ("grpc.keepalive_permit_without_calls", 1),
        # Accept client pings down to this interval (gRPC's default is 5 minutes once no data flows)...
        ("grpc.http2.min_recv_ping_interval_without_data_ms", SERVER_MIN_PING_INTERVAL_MS),
        # ...and never answer pings that come faster with GOAWAY: 0 = unlimited strikes. A GOAWAY would cancel every
        # stream on the connection, and the gateway multiplexes all of its calls to a worker on one connection.
        ("grpc.http2.max_ping_strikes", 0),
        # Linux's SO_REUSEPORT (gRPC's default) would let a second server bind a port already in use and silently
        # share its traffic; a port conflict must fail loudly instead.
        ("grpc.so_reuseport", 0),
    ]


def channel_options() -> list[tuple[str, int]]:
    """Channel arguments for every kvrelay client channel, matching `server_options`' keepalive policy."""
    return [
        ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
        ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
        ("grpc.keepalive_time_ms", CLIENT_KEEPALIVE_TIME_MS),
        ("grpc.keepalive_timeout_ms", CLIENT_KEEPALIVE_TIMEOUT_MS),
        ("grpc.keepalive_permit_without_calls", 1),
        # gRPC's default (2) stops pinging after two pings without data: a Prefill queued for a minute would go
        # unwatched. The servers accept unlimited pings at this rate (see server_options).
        ("grpc.http2.max_pings_without_data", 0),
        # Reconnect to a restarted worker within seconds: the default backoff starts at 1 s and grows to 120 s.
        ("grpc.initial_reconnect_backoff_ms", 250),
        ("grpc.max_reconnect_backoff_ms", 5_000),
    ]


def internal_channel(address: str) -> grpc.aio.Channel:
    """A channel to an internal service of the deployment (a worker, the kvstore): every call on it carries the
    deployment secret (KVRELAY_DEPLOYMENT_SECRET), when this process has one."""
    interceptors = internal_client_interceptors()
    return grpc.aio.insecure_channel(address, options=channel_options(), interceptors=interceptors or None)


async def start_server(
    servicers: Sequence[tuple[AddServicerFn, object]],
    service_names: Sequence[str],
    port: int,
    host: str = "127.0.0.1",
    max_receive_bytes: int = MAX_MESSAGE_BYTES,
    *,
    interceptors: Sequence[grpc.aio.ServerInterceptor] | None = None,
    tls: grpc.ServerCredentials | None = None,
    unix_socket: str | None = None,
) -> tuple[grpc.aio.Server, HealthServicer]:
    """Create, bind and start a grpc.aio server with kvrelay's options.

    servicers: (add_XServicer_to_server, servicer) pairs from the generated *_pb2_grpc modules.
    service_names: full names of those services (e.g. "kvrelay.internal.v1.Decode"), for health and reflection.
    port: a concrete port (0 is refused: the caller could not tell where the server listens).
    interceptors: who may call. None: an internal service, whose calls need the deployment secret
    (`kvrelay.rpc.auth.internal_server_interceptors`; open, with a warning, when the process has none); the public
    gateway passes its own (API keys), or [] for none. Health and reflection always stay open.
    tls: credentials for the port (`kvrelay.rpc.auth.server_tls_credentials`); None: plaintext.
    unix_socket: also listen, plaintext, on this Unix socket path (`kvrelay up` health-checks a TLS gateway through
    one in its private folder: with client certificates required, it could not over TLS).

    The health service starts with the overall status ("") and every listed service NOT_SERVING: a process is
    reachable long before its model is loaded, and routers must not send it work. Call `set_serving(..., True)` once
    it can serve. Raises RuntimeError if the port cannot be bound.
    """
    if port <= 0:
        raise ValueError(f"port must be a concrete port > 0, got {port}")
    if interceptors is None:
        interceptors = internal_server_interceptors()
    # who may call first (kvrelay/rpc/auth.py), then the guard: undecodable requests get INVALID_ARGUMENT, escaped
    # exceptions a real status, never UNKNOWN (imported here: the guard knows Redis' errors, and a client that only
    # imports channel_options needs no Redis, which costs `kvrelay generate` ~90 ms of start-up)
    from kvrelay.rpc.guard import GuardInterceptor

    server = grpc.aio.server(
        options=server_options(max_receive_bytes), interceptors=[*interceptors, GuardInterceptor()]
    )
    for add_servicer, servicer in servicers:
        add_servicer(servicer, server)

    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    await set_serving(health_servicer, service_names, serving=False)

    # Reflection lets grpcurl and grpcui call the services without the .proto files.
    reflection.enable_server_reflection(
        [*service_names, health.SERVICE_NAME, reflection.SERVICE_NAME],
        server,
    )

    address = f"{host}:{port}"
    try:
        bound = server.add_secure_port(address, tls) if tls is not None else server.add_insecure_port(address)
        if unix_socket:
            server.add_insecure_port(f"unix:{unix_socket}")
    except RuntimeError as exc:  # grpc raises "Failed to bind to address ..." in recent versions
        raise RuntimeError(f"cannot listen on {address}: {exc} (is another process using the port?)") from exc
    if bound != port:  # older grpc versions return 0 instead of raising
        raise RuntimeError(f"cannot listen on {address} (is another process using the port?)")
    await server.start()
    return server, health_servicer


async def set_serving(health_servicer: HealthServicer, service_names: Sequence[str], serving: bool) -> None:
    """Set the overall status ("") and each listed service's status to SERVING or NOT_SERVING."""
    status = health_pb2.HealthCheckResponse.SERVING if serving else health_pb2.HealthCheckResponse.NOT_SERVING
    for name in [health.OVERALL_HEALTH, *service_names]:
        await health_servicer.set(name, status)


async def stop_server(server: grpc.aio.Server, health_servicer: HealthServicer, grace_s: float = 5.0) -> None:
    """Graceful shutdown: report NOT_SERVING first (routers stop sending work), then let running calls finish.

    Calls still running after grace_s are cancelled. The health status cannot be set back to SERVING afterwards.
    """
    await health_servicer.enter_graceful_shutdown()
    await server.stop(grace_s)


def install_uvloop() -> bool:
    """Make uvloop the event loop of later `asyncio.run` calls, if it is installed; return whether it is.

    Call before any event loop exists. uvloop is optional: a faster loop for the gateway's many streams, nothing more.
    """
    try:
        import uvloop
    except ImportError:
        return False
    asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
    return True

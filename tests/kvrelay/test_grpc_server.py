"""The shared gRPC bootstrap: health starts NOT_SERVING, set_serving flips it, reflection lists the services,
wait_healthy waits and times out clearly, a taken port fails loudly. No pytest-asyncio: each test runs its own loop."""

from __future__ import annotations

import asyncio
import socket
import time

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from kvrelay.internal.v1 import kvstore_pb2, kvstore_pb2_grpc
from kvrelay.rpc import grpc_server
from kvrelay.rpc.grpc_server import channel_options, install_uvloop, set_serving, start_server, stop_server
from kvrelay.rpc.health import wait_healthy

SERVICE = kvstore_pb2.DESCRIPTOR.services_by_name["KVStore"].full_name  # "kvrelay.internal.v1.KVStore"


class TinyKVStore(kvstore_pb2_grpc.KVStoreServicer):
    async def GetLayout(self, request, context):
        return kvstore_pb2.Layout(model_dir="/models/tiny", kv_dtype="int8")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


async def start_tiny() -> tuple[grpc.aio.Server, grpc_server.HealthServicer, str]:
    port = free_port()
    server, health = await start_server(
        [(kvstore_pb2_grpc.add_KVStoreServicer_to_server, TinyKVStore())], [SERVICE], port
    )
    return server, health, f"127.0.0.1:{port}"


async def check(channel: grpc.aio.Channel, service: str) -> str:
    reply = await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=service), timeout=5)
    return health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)


async def list_services(channel: grpc.aio.Channel) -> set[str]:
    stub = reflection_pb2_grpc.ServerReflectionStub(channel)
    call = stub.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")]), timeout=5)
    names: set[str] = set()
    async for reply in call:
        names.update(service.name for service in reply.list_services_response.service)
    return names


def test_health_starts_not_serving_then_serving():
    async def main() -> None:
        server, health, address = await start_tiny()
        try:
            async with grpc.aio.insecure_channel(address, options=channel_options()) as channel:
                assert await check(channel, "") == "NOT_SERVING"
                assert await check(channel, SERVICE) == "NOT_SERVING"
                with pytest.raises(grpc.aio.AioRpcError) as info:
                    await check(channel, "kvrelay.v1.NoSuchService")
                assert info.value.code() == grpc.StatusCode.NOT_FOUND

                await set_serving(health, [SERVICE], serving=True)
                assert await check(channel, "") == "SERVING"
                assert await check(channel, SERVICE) == "SERVING"
                await wait_healthy(address, SERVICE, timeout_s=5)

                # The registered servicer answers, with the server's message options in place.
                layout = await kvstore_pb2_grpc.KVStoreStub(channel).GetLayout(kvstore_pb2.GetLayoutRequest())
                assert layout.kv_dtype == "int8"

                await set_serving(health, [SERVICE], serving=False)
                assert await check(channel, SERVICE) == "NOT_SERVING"
        finally:
            await stop_server(server, health, grace_s=0)

    asyncio.run(main())


def test_reflection_lists_the_services():
    async def main() -> None:
        server, health, address = await start_tiny()
        try:
            async with grpc.aio.insecure_channel(address, options=channel_options()) as channel:
                assert await list_services(channel) == {
                    SERVICE,
                    "grpc.health.v1.Health",
                    "grpc.reflection.v1alpha.ServerReflection",
                }
        finally:
            await stop_server(server, health, grace_s=0)

    asyncio.run(main())


def test_wait_healthy_times_out_on_a_dead_port():
    address = f"127.0.0.1:{free_port()}"  # nothing listens there
    start = time.monotonic()
    with pytest.raises(TimeoutError) as info:
        asyncio.run(wait_healthy(address, timeout_s=0.5))
    assert time.monotonic() - start < 3.0
    message = str(info.value)
    assert address in message and "within 0.5 s" in message and "UNAVAILABLE" in message


def test_wait_healthy_times_out_while_not_serving():
    async def main() -> None:
        server, health, address = await start_tiny()
        try:
            with pytest.raises(TimeoutError, match=r"service 'kvrelay\.internal\.v1\.KVStore'.*NOT_SERVING"):
                await wait_healthy(address, SERVICE, timeout_s=0.3)
        finally:
            await stop_server(server, health, grace_s=0)

    asyncio.run(main())


def test_wait_healthy_sees_a_late_start():
    async def main() -> None:
        server, health, address = await start_tiny()
        try:
            waiter = asyncio.create_task(wait_healthy(address, timeout_s=5))
            await asyncio.sleep(0.2)
            assert not waiter.done()
            await set_serving(health, [SERVICE], serving=True)
            await asyncio.wait_for(waiter, timeout=3)
        finally:
            await stop_server(server, health, grace_s=0)

    asyncio.run(main())


def test_a_taken_port_fails_loudly():
    async def main() -> None:
        server, health, address = await start_tiny()
        try:
            port = int(address.rsplit(":", 1)[1])
            with pytest.raises(RuntimeError, match="cannot listen"):
                await start_server([], [SERVICE], port)
        finally:
            await stop_server(server, health, grace_s=0)

    asyncio.run(main())


def test_port_zero_is_refused():
    with pytest.raises(ValueError, match="port"):
        asyncio.run(start_server([], [], 0))


def test_keepalive_policies_agree():
    server = dict(grpc_server.server_options())
    client = dict(channel_options())
    # A client that pings more often than the server accepts gets GOAWAY, which cancels every stream on the connection.
    assert client["grpc.keepalive_time_ms"] >= 2 * server["grpc.http2.min_recv_ping_interval_without_data_ms"]
    assert server["grpc.http2.max_ping_strikes"] == 0
    assert client["grpc.max_receive_message_length"] == server["grpc.max_send_message_length"] == 64 * 1024 * 1024


def test_serves_under_uvloop():
    pytest.importorskip("uvloop")

    async def main() -> str:
        server, health, address = await start_tiny()
        try:
            await set_serving(health, [SERVICE], serving=True)
            await wait_healthy(address, SERVICE, timeout_s=5)
            return type(asyncio.get_running_loop()).__module__
        finally:
            await stop_server(server, health, grace_s=0)

    assert install_uvloop()
    try:
        assert asyncio.run(main()).startswith("uvloop")
    finally:
        asyncio.set_event_loop_policy(None)  # later tests get the default loop again

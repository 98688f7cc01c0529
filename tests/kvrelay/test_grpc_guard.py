"""No request ends with UNKNOWN (kvrelay/rpc/guard.py, installed by start_server on every kvrelay server): bytes that
do not parse get INVALID_ARGUMENT and no traceback, a Redis error UNAVAILABLE, any other escaped exception INTERNAL;
streaming handlers (context.write or async generators) too. A real grpc.aio server, raw client calls."""

from __future__ import annotations

import asyncio
import logging

import grpc
import redis.exceptions

from kvrelay.rpc.grpc_server import channel_options, start_server, stop_server
from kvrelay.v1 import gateway_pb2, gateway_pb2_grpc
from tests.kvrelay.test_grpc_server import free_port

SERVICE = "kvrelay.v1.Gateway"
# GenerateRequest.prompt (field 1, length-delimited) holding bytes that are not UTF-8
BAD_UTF8 = b"\x0a\x04ab\xff\xfe"


class Flaky(gateway_pb2_grpc.GatewayServicer):
    """Generate streams with context.write and then fails as its prompt says; Complete fails the same way."""

    async def Generate(self, request, context):  # noqa: N802
        await context.write(gateway_pb2.GenerateResponse(token_ids=[1]))
        fail(request.prompt)

    async def Complete(self, request, context):  # noqa: N802
        fail(request.prompt)
        return gateway_pb2.CompleteResponse(text=request.prompt)


def fail(how: str) -> None:
    if how == "redis":
        raise redis.exceptions.MaxConnectionsError("Too many connections")
    if how == "bug":
        raise RuntimeError("a bug")
    if how in ("downstream", "downstream-unknown"):  # a call of the handler's own failed
        code = grpc.StatusCode.UNKNOWN if how == "downstream-unknown" else grpc.StatusCode.CANCELLED
        raise grpc.aio.AioRpcError(code, grpc.aio.Metadata(), grpc.aio.Metadata(), details="session s aborted")


async def calls(address: str) -> dict[str, tuple[grpc.StatusCode, str]]:
    out = {}
    async with grpc.aio.insecure_channel(address, options=channel_options()) as channel:
        raw = {
            kind: channel.unary_unary(f"/{SERVICE}/Complete", request_serializer=lambda b: b)
            if kind == "unary"
            else channel.unary_stream(f"/{SERVICE}/Generate", request_serializer=lambda b: b)
            for kind in ("unary", "stream")
        }
        stub = gateway_pb2_grpc.GatewayStub(channel)
        for kind in ("unary", "stream"):
            for name, body in (("bad-utf8", BAD_UTF8), ("garbage", b"\xff\xff\xff\x07")):
                try:
                    call = raw[kind](body, timeout=10)
                    if kind == "stream":
                        [m async for m in call]
                    else:
                        await call
                    out[f"{kind}-{name}"] = (grpc.StatusCode.OK, "")
                except grpc.aio.AioRpcError as exc:
                    out[f"{kind}-{name}"] = (exc.code(), exc.details())
            for how in ("redis", "bug", "downstream", "downstream-unknown", "fine"):
                request = gateway_pb2.GenerateRequest(prompt=how)
                try:
                    if kind == "stream":
                        [m async for m in stub.Generate(request, timeout=10)]
                    else:
                        await stub.Complete(request, timeout=10)
                    out[f"{kind}-{how}"] = (grpc.StatusCode.OK, "")
                except grpc.aio.AioRpcError as exc:
                    out[f"{kind}-{how}"] = (exc.code(), exc.details())
    return out


def test_every_failure_gets_a_real_status(caplog):
    async def main():
        port = free_port()
        servicers = [(gateway_pb2_grpc.add_GatewayServicer_to_server, Flaky())]
        server, health = await start_server(servicers, [SERVICE], port)
        try:
            return await calls(f"127.0.0.1:{port}")
        finally:
            await stop_server(server, health, grace_s=0)

    with caplog.at_level(logging.INFO):
        out = asyncio.run(main())
    for kind in ("unary", "stream"):
        code, details = out[f"{kind}-bad-utf8"]
        assert code == grpc.StatusCode.INVALID_ARGUMENT, out
        assert "kvrelay.v1.GenerateRequest" in details and "UTF-8" in details
        assert out[f"{kind}-garbage"][0] == grpc.StatusCode.INVALID_ARGUMENT, out
        code, details = out[f"{kind}-redis"]
        assert code == grpc.StatusCode.UNAVAILABLE and "Redis" in details and "Too many connections" in details
        code, details = out[f"{kind}-bug"]
        assert code == grpc.StatusCode.INTERNAL and "a bug" in details
        assert out[f"{kind}-downstream"] == (grpc.StatusCode.CANCELLED, "session s aborted")
        assert out[f"{kind}-downstream-unknown"] == (grpc.StatusCode.INTERNAL, "session s aborted")
        assert out[f"{kind}-fine"][0] == grpc.StatusCode.OK
    # undecodable requests and Redis errors leave no traceback in the log; only the bug does (once per call)
    tracebacks = [r for r in caplog.records if r.exc_info or r.exc_text]
    assert len(tracebacks) == 2 and all("a bug" in str(r.exc_info[1]) for r in tracebacks), [
        r.getMessage() for r in tracebacks
    ]


class LateWriter(gateway_pb2_grpc.GatewayServicer):
    """Writes after its client cancelled (the cancellation reached the handler too late to stop it)."""

    def __init__(self) -> None:
        self.failed: list[str] = []

    async def Generate(self, request, context):  # noqa: N802
        try:
            await asyncio.shield(asyncio.sleep(0.3))
        except asyncio.CancelledError:
            await asyncio.sleep(0.2)
        try:
            await context.write(gateway_pb2.GenerateResponse(token_ids=[1]))
        except Exception as exc:
            self.failed.append(type(exc).__name__)
            raise


def test_a_send_after_the_client_left_is_no_error(caplog):
    """gRPC raises ExecuteBatchError from the write (and context.cancelled() still says False): the call is over,
    nobody hears a status, and it is not logged as a bug."""
    servicer = LateWriter()

    async def main():
        port = free_port()
        server, health = await start_server(
            [(gateway_pb2_grpc.add_GatewayServicer_to_server, servicer)], [SERVICE], port
        )
        try:
            async with grpc.aio.insecure_channel(f"127.0.0.1:{port}", options=channel_options()) as channel:
                call = gateway_pb2_grpc.GatewayStub(channel).Generate(gateway_pb2.GenerateRequest())
                await asyncio.sleep(0.1)
                call.cancel()
                await asyncio.sleep(0.8)
        finally:
            await stop_server(server, health, grace_s=0)

    with caplog.at_level(logging.INFO):
        asyncio.run(main())
    assert servicer.failed == ["ExecuteBatchError"]
    assert not [r for r in caplog.records if r.exc_info or r.exc_text or r.levelno >= logging.ERROR]

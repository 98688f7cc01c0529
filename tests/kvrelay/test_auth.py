"""Who may call: the deployment secret of internal services, API keys and TLS at the gateway (kvrelay/rpc/auth.py).

Real grpc.aio servers on free ports (start_server, as every process starts), real clients (internal_channel, the SDK's
Client and AsyncClient); certificates made with openssl (tests/certs.py). No pytest-asyncio: each test runs its loop.
"""

from __future__ import annotations

import asyncio
import logging
import socket

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from kvrelay.client import AsyncClient, Client
from kvrelay.internal.v1 import decode_pb2, decode_pb2_grpc, kvstore_pb2, kvstore_pb2_grpc
from kvrelay.rpc import auth
from kvrelay.rpc.auth import (
    SECRET_ENV,
    SECRET_METADATA,
    ApiKeyGate,
    ApiKeys,
    SecurityConfigError,
    internal_server_interceptors,
    server_tls_credentials,
    session_namespace,
)
from kvrelay.rpc.grpc_server import internal_channel, set_serving, start_server, stop_server
from kvrelay.v1 import gateway_pb2, gateway_pb2_grpc
from tests.certs import make_certs

KVSTORE = "kvrelay.internal.v1.KVStore"
DECODE = "kvrelay.internal.v1.Decode"
GATEWAY = "kvrelay.v1.Gateway"
SECRET = "the-deployment-secret-of-this-test"
KEYS = ("key-alice-0123456789abcdef", "key-bob-0123456789abcdef")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class TinyKVStore(kvstore_pb2_grpc.KVStoreServicer):
    async def GetLayout(self, request, context):  # noqa: N802
        return kvstore_pb2.Layout(model_dir="/models/tiny")


class TinyDecode(decode_pb2_grpc.DecodeServicer):
    async def Decode(self, request, context):  # noqa: N802
        for token in (1, 2, 3):
            await context.write(decode_pb2.DecodeResponse(token_ids=[token]))


class TinyGateway(gateway_pb2_grpc.GatewayServicer):
    """Echoes the session id it would store the request's session under (ApiKeys.scoped_session_id)."""

    api_keys = ApiKeys()

    async def GetModelInfo(self, request, context):  # noqa: N802
        return gateway_pb2.ModelInfo(name="tiny")

    async def Complete(self, request, context):  # noqa: N802
        stored = await self.api_keys.scoped_session_id(context, request.session_id)
        out = gateway_pb2.CompleteResponse(text=stored)
        out.finish.session_id = self.api_keys.client_session_id(stored)
        return out


async def serve_internal(interceptors=None, *, monkeypatch=None, env_secret: str | None = None):
    """A kvstore and a decode servicer on one internal server; env_secret: KVRELAY_DEPLOYMENT_SECRET meanwhile."""
    if monkeypatch is not None:
        if env_secret is None:
            monkeypatch.delenv(SECRET_ENV, raising=False)
        else:
            monkeypatch.setenv(SECRET_ENV, env_secret)
    port = free_port()
    servicers = [
        (kvstore_pb2_grpc.add_KVStoreServicer_to_server, TinyKVStore()),
        (decode_pb2_grpc.add_DecodeServicer_to_server, TinyDecode()),
    ]
    server, health = await start_server(servicers, [KVSTORE, DECODE], port, interceptors=interceptors)
    await set_serving(health, [KVSTORE, DECODE], serving=True)
    return server, health, f"127.0.0.1:{port}"


async def status_of(call) -> grpc.StatusCode:
    try:
        await call
    except grpc.aio.AioRpcError as exc:
        return exc.code()
    return grpc.StatusCode.OK


async def refused(call) -> str:
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await call
    assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED, info.value
    return info.value.details()


async def stream_tokens(channel: grpc.aio.Channel) -> list[int]:
    call = decode_pb2_grpc.DecodeStub(channel).Decode(decode_pb2.DecodeRequest(session_id="s"), timeout=5)
    return [t async for message in call for t in message.token_ids]


async def health_and_reflection_answer(channel: grpc.aio.Channel) -> None:
    reply = await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=""), timeout=5)
    assert reply.status == health_pb2.HealthCheckResponse.SERVING
    stub = reflection_pb2_grpc.ServerReflectionStub(channel)
    call = stub.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")]), timeout=5)
    names = {s.name async for reply in call for s in reply.list_services_response.service}
    assert KVSTORE in names or GATEWAY in names


# --- the deployment secret -------------------------------------------------------------------------------------------


def test_internal_services_refuse_calls_without_the_secret(monkeypatch):
    async def main() -> None:
        server, health, address = await serve_internal(monkeypatch=monkeypatch, env_secret=SECRET)  # default gate
        try:
            async with grpc.aio.insecure_channel(address) as plain:
                layout = kvstore_pb2_grpc.KVStoreStub(plain).GetLayout(kvstore_pb2.GetLayoutRequest(), timeout=5)
                assert "deployment's secret" in await refused(layout)
                with pytest.raises(grpc.aio.AioRpcError) as info:  # a server stream, refused before any message
                    await stream_tokens(plain)
                assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED
                # a method that does not exist is refused the same (no probing for names without the secret)
                unknown = plain.unary_unary("/kvrelay.internal.v1.KVStore/NoSuchMethod")(b"", timeout=5)
                assert await status_of(unknown) == grpc.StatusCode.UNAUTHENTICATED
                wrong = kvstore_pb2_grpc.KVStoreStub(plain).GetLayout(
                    kvstore_pb2.GetLayoutRequest(), metadata=((SECRET_METADATA, SECRET + "x"),), timeout=5
                )
                assert "wrong deployment secret" in await refused(wrong)
                await health_and_reflection_answer(plain)  # probes stay open

            async with internal_channel(address) as channel:  # sends KVRELAY_DEPLOYMENT_SECRET
                layout = await kvstore_pb2_grpc.KVStoreStub(channel).GetLayout(kvstore_pb2.GetLayoutRequest())
                assert layout.model_dir == "/models/tiny"
                assert await stream_tokens(channel) == [1, 2, 3]

            monkeypatch.setenv(SECRET_ENV, "another deployment's secret")
            async with internal_channel(address) as other:
                call = kvstore_pb2_grpc.KVStoreStub(other).GetLayout(kvstore_pb2.GetLayoutRequest(), timeout=5)
                assert "wrong deployment secret" in await refused(call)
        finally:
            await stop_server(server, health, grace_s=0)

    asyncio.run(main())


def test_without_a_secret_internal_services_stay_open_and_warn_once(monkeypatch, caplog):
    monkeypatch.setattr(auth, "_warned_open", False)

    async def main() -> None:
        with caplog.at_level(logging.WARNING, logger="kvrelay.auth"):
            first = await serve_internal(monkeypatch=monkeypatch, env_secret=None)
            second = await serve_internal(monkeypatch=monkeypatch, env_secret=None)
        try:
            for _, _, address in (first, second):
                async with internal_channel(address) as channel:  # no secret to send: a plain channel
                    layout = await kvstore_pb2_grpc.KVStoreStub(channel).GetLayout(kvstore_pb2.GetLayoutRequest())
                    assert layout.model_dir == "/models/tiny"
        finally:
            for server, health, _ in (first, second):
                await stop_server(server, health, grace_s=0)

    asyncio.run(main())
    warnings = [r for r in caplog.records if SECRET_ENV in r.getMessage()]
    assert len(warnings) == 1, [r.getMessage() for r in caplog.records]


def test_an_explicit_secret_gate_and_an_open_server(monkeypatch):
    async def main() -> None:
        gated = await serve_internal(internal_server_interceptors(SECRET), monkeypatch=monkeypatch, env_secret=None)
        opened = await serve_internal([], monkeypatch=monkeypatch, env_secret=SECRET)  # [] = no gate at all
        try:
            async with grpc.aio.insecure_channel(gated[2]) as plain:
                await refused(kvstore_pb2_grpc.KVStoreStub(plain).GetLayout(kvstore_pb2.GetLayoutRequest(), timeout=5))
            async with grpc.aio.insecure_channel(opened[2]) as plain:
                assert (await kvstore_pb2_grpc.KVStoreStub(plain).GetLayout(kvstore_pb2.GetLayoutRequest())).model_dir
        finally:
            for server, health, _ in (gated, opened):
                await stop_server(server, health, grace_s=0)

    asyncio.run(main())


# --- API keys --------------------------------------------------------------------------------------------------------


def test_the_secret_variables_are_documented_with_the_settings():
    from kvrelay.settings import SECRET_VARIABLES

    assert {auth.SECRET_ENV, auth.API_KEYS_ENV} == {var for _, var, _ in SECRET_VARIABLES}


def test_api_keys_come_from_a_file_with_comments_and_the_environment(tmp_path):
    path = tmp_path / "keys"
    path.write_text("# the team's keys\n\n  key-alice-0123456789abcdef  # alice\nkey-bob-0123456789abcdef\n")
    keys = ApiKeys.load(str(path), env={"KVRELAY_API_KEYS": " key-carol-0123456789abcdef , ,short"})
    assert len(keys) == 4
    assert keys.short == 1
    described = keys.describe()
    assert "4 API key(s)" in described and "key-" not in described  # never a key in the log
    for key in ("key-alice-0123456789abcdef", "key-carol-0123456789abcdef", "short"):
        assert keys.namespace([("authorization", f"Bearer {key}")]) == session_namespace(key)
    assert keys.namespace([("authorization", "Bearer key-alice")]) is None  # a prefix is not the key

    assert len(ApiKeys.load(None, env={})) == 0
    assert "no API keys" in ApiKeys.load(None, env={}).describe()
    (tmp_path / "empty").write_text("# nobody yet\n\n")
    with pytest.raises(SecurityConfigError, match="holds no key"):  # fail closed: not an open gateway
        ApiKeys.load(str(tmp_path / "empty"), env={})
    with pytest.raises(SecurityConfigError, match="cannot read"):
        ApiKeys.load(str(tmp_path / "missing"), env={})
    (tmp_path / "spaces").write_text("two words\n")
    with pytest.raises(SecurityConfigError, match="line 1"):
        ApiKeys.load(str(tmp_path / "spaces"), env={})


def test_sessions_are_scoped_to_the_key():
    keys = ApiKeys(KEYS)
    a, b = (session_namespace(k) for k in KEYS)
    assert a != b and len(a) == 16 and all(c in "0123456789abcdef" for c in a)
    assert not any(k in a or a in k for k in KEYS)

    class Context:
        def __init__(self, key: str) -> None:
            self.metadata = (("authorization", f"Bearer {key}"),)

        def invocation_metadata(self):
            return self.metadata

    async def main() -> None:
        stored_a = await keys.scoped_session_id(Context(KEYS[0]), "chat.1")
        stored_b = await keys.scoped_session_id(Context(KEYS[1]), "chat.1")
        assert stored_a == f"{a}.chat.1" and stored_b == f"{b}.chat.1"
        assert keys.client_session_id(stored_a) == keys.client_session_id(stored_b) == "chat.1"
        # another key's namespace sent as part of an id stays inside the sender's own namespace
        assert await keys.scoped_session_id(Context(KEYS[1]), stored_a) == f"{b}.{stored_a}"
        open_keys = ApiKeys()
        assert await open_keys.scoped_session_id(Context("x"), "chat.1") == "chat.1"
        assert open_keys.client_session_id("chat.1") == "chat.1"

    asyncio.run(main())


def test_the_gateway_gate_wants_a_bearer_key_and_leaves_probes_open(monkeypatch):
    monkeypatch.delenv(SECRET_ENV, raising=False)

    async def main() -> None:
        keys = ApiKeys(KEYS)
        servicer = TinyGateway()
        servicer.api_keys = keys
        port = free_port()
        servicers = [(gateway_pb2_grpc.add_GatewayServicer_to_server, servicer)]
        server, health = await start_server(servicers, [GATEWAY], port, interceptors=[ApiKeyGate(keys)])
        await set_serving(health, [GATEWAY], serving=True)
        address = f"127.0.0.1:{port}"
        try:
            async with grpc.aio.insecure_channel(address) as plain:
                stub = gateway_pb2_grpc.GatewayStub(plain)
                info = gateway_pb2.GetModelInfoRequest()
                assert "missing API key" in await refused(stub.GetModelInfo(info, timeout=5))
                basic = (("authorization", "Basic a2V5"),)
                assert "Bearer" in await refused(stub.GetModelInfo(info, metadata=basic, timeout=5))
                wrong = (("authorization", "Bearer not-a-key"),)
                assert await refused(stub.GetModelInfo(info, metadata=wrong, timeout=5)) == "invalid API key"
                await health_and_reflection_answer(plain)

            async with AsyncClient(address, api_key="not-a-key") as client:
                assert await status_of(client.model_info()) == grpc.StatusCode.UNAUTHENTICATED
            async with AsyncClient(address, api_key=KEYS[0]) as alice, AsyncClient(address, api_key=KEYS[1]) as bob:
                assert (await alice.model_info()).name == "tiny"
                # the key travels on the channel, so calls made on .stub directly (the load generator's) carry it too
                assert (await alice.stub.GetModelInfo(gateway_pb2.GetModelInfoRequest())).name == "tiny"
                mine = await alice.complete(prompt="x", session_id="chat")
                theirs = await bob.complete(prompt="x", session_id="chat")
                assert mine.text != theirs.text  # stored apart
                assert mine.finish.session_id == theirs.finish.session_id == "chat"  # each sees its own id

            def blocking() -> str:
                with Client(address, api_key=KEYS[1]) as client:
                    return client.model_info().name

            assert await asyncio.to_thread(blocking) == "tiny"

            def blocking_without_key() -> grpc.StatusCode:
                with Client(address) as client:
                    try:
                        client.model_info()
                    except grpc.RpcError as exc:
                        return exc.code()
                return grpc.StatusCode.OK

            assert await asyncio.to_thread(blocking_without_key) == grpc.StatusCode.UNAUTHENTICATED
        finally:
            await stop_server(server, health, grace_s=0)

    asyncio.run(main())


# --- TLS -------------------------------------------------------------------------------------------------------------


def test_tls_and_client_certificates(tmp_path, monkeypatch):
    monkeypatch.delenv(SECRET_ENV, raising=False)
    certs = make_certs(tmp_path / "certs")

    async def serve(client_ca):
        port = free_port()
        tls = server_tls_credentials(str(certs.server_cert), str(certs.server_key), client_ca)
        servicers = [(gateway_pb2_grpc.add_GatewayServicer_to_server, TinyGateway())]
        server, health = await start_server(servicers, [GATEWAY], port, interceptors=[], tls=tls)
        await set_serving(health, [GATEWAY], serving=True)
        return server, health, f"127.0.0.1:{port}"

    async def name(address: str, **kwargs) -> str | grpc.StatusCode:
        async with AsyncClient(address, **kwargs) as client:
            try:
                return (await client.stub.GetModelInfo(gateway_pb2.GetModelInfoRequest(), timeout=5)).name
            except grpc.aio.AioRpcError as exc:
                return exc.code()

    async def main() -> None:
        tls_only = await serve(None)
        mutual = await serve(str(certs.ca))
        try:
            assert await name(tls_only[2], tls_ca=certs.ca) == "tiny"
            assert await name(tls_only[2]) == grpc.StatusCode.UNAVAILABLE  # plaintext to a TLS port
            assert await name(tls_only[2], tls_ca=certs.other_ca) == grpc.StatusCode.UNAVAILABLE  # unknown issuer

            client_cert = {"tls_cert": certs.client_cert, "tls_key": certs.client_key}
            assert await name(mutual[2], tls_ca=certs.ca, **client_cert) == "tiny"
            assert await name(mutual[2], tls_ca=certs.ca) == grpc.StatusCode.UNAVAILABLE  # no client certificate
            assert await name(mutual[2]) == grpc.StatusCode.UNAVAILABLE

            def blocking() -> str:
                with Client(mutual[2], tls_ca=certs.ca, **client_cert) as client:
                    return client.model_info().name

            assert await asyncio.to_thread(blocking) == "tiny"
        finally:
            for server, health, _ in (tls_only, mutual):
                await stop_server(server, health, grace_s=0)

    asyncio.run(main())


def test_tls_settings_that_cannot_work_are_refused(tmp_path):
    assert server_tls_credentials(None, None) is None
    with pytest.raises(SecurityConfigError, match="both"):
        server_tls_credentials("cert.pem", None)
    with pytest.raises(SecurityConfigError, match="needs --tls-cert"):
        server_tls_credentials(None, None, "ca.pem")
    with pytest.raises(SecurityConfigError, match="cannot read"):
        server_tls_credentials(str(tmp_path / "nope.pem"), str(tmp_path / "nope.key"))
    with pytest.raises(SecurityConfigError, match="both"):
        Client("127.0.0.1:1", tls_cert="client.pem")

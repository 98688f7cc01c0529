"""Nobody is let in who should not be, against real `kvrelay up` deployments (kvrelay.deployment.Deployment):

- every internal service (kvstore, prefill, decode) answers UNAUTHENTICATED without the deployment secret, and the
  secret reaches every process in its environment only (no command line, no log);
- the gateway wants an API key when keys are set, and a session id sent with another key names another session
  (cached_prompt_tokens 0: nothing about the first conversation can be tested token by token);
- a TLS gateway that wants client certificates answers a client with the CA and a certificate, and no plaintext one;
- the /dev/shm regions are the deployment user's alone (0600), the launcher's folder too (0700);
- idle sessions expire after --session-ttl.

Two deployments, one per class, each stopped before the next starts (a 2-core machine runs one at a time well).
"""

from __future__ import annotations

import asyncio
import os
import stat
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from kvrelay.client import Client
from kvrelay.deployment import REDIS_URL, Deployment
from kvrelay.errors import UsageError
from kvrelay.internal.v1 import (
    decode_pb2,
    decode_pb2_grpc,
    kvstore_pb2,
    kvstore_pb2_grpc,
    prefill_pb2,
    prefill_pb2_grpc,
)
from kvrelay.launcher import Launcher
from kvrelay.rpc.auth import SECRET_ENV, SECRET_METADATA, session_namespace
from kvrelay.settings import UpSettings
from kvrelay.v1 import common_pb2
from kvstore.sessions import SessionState, SessionStore
from kvstore.shm import shm_path
from tests.certs import make_certs

ALICE, BOB = "alice-key-0123456789abcdef", "bob-key-0123456789abcdef"
CAROL = "carol-key-0123456789abcdef"
SECRET = f"preset-secret-{uuid.uuid4().hex}"
PROMPT = [200 + i % 50 for i in range(40)]  # 40 tokens: more than two 16-token blocks to reuse
TTL_S = 3.0


def workers(d: Deployment) -> dict[str, str]:
    """role -> address of the deployment's registered workers (and the kvstore, at the base port)."""

    async def read():
        async with SessionStore(REDIS_URL, d.name) as store:
            return {w.role: w.address for w in await store.list_workers()}

    return {**asyncio.run(read()), "kvstore": f"127.0.0.1:{d.base_port}"}


def code_of(method, *args, **kwargs) -> grpc.StatusCode:
    """The status of one call (a server stream is read to its end)."""
    try:
        result = method(*args, **kwargs)
        if hasattr(result, "__iter__") and not hasattr(result, "ByteSize"):
            list(result)
    except grpc.RpcError as exc:
        return exc.code()
    return grpc.StatusCode.OK


def kvrelay_cli(*argv: str, env: dict[str, str]) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "kvrelay.cli", *argv], capture_output=True, text=True, env=os.environ | env, timeout=120
    )


def child_environ(pid: int) -> dict[str, str]:
    raw = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    return dict(item.decode(errors="replace").split("=", 1) for item in raw if b"=" in item)


def secret_stays_in_environments(d: Deployment) -> str:
    """Every child but redis has one KVRELAY_DEPLOYMENT_SECRET in its environment, on no command line and in no log.
    Returns it."""
    children = [p for p in d.processes() if p.role != "redis"]
    assert {p.role for p in children} >= {"kvstore", "prefill", "decode", "gateway"}
    secrets = {child_environ(p.pid).get(SECRET_ENV) for p in children}
    assert len(secrets) == 1 and None not in secrets and "" not in secrets, "one secret, in every process"
    (secret,) = secrets
    assert len(secret) >= 32
    ps = subprocess.run(["ps", "-ww", "-eo", "args"], capture_output=True, text=True).stdout
    assert secret not in ps
    assert secret not in d.output()
    return secret


# --- API keys, the deployment secret, private memory -----------------------------------------------------------------


@pytest.fixture(scope="class")
def keyed(tmp_path_factory):
    keys = tmp_path_factory.mktemp("keys") / "api-keys"
    keys.write_text(f"# who may call\n{ALICE}  # alice\n\n{BOB}\n")
    d = Deployment("--num-blocks", "64", "--api-keys-file", str(keys), env={SECRET_ENV: SECRET})
    yield d
    assert d.stop() == 0
    assert d.leftovers() == []


class TestKeysAndSecret:
    def test_internal_services_refuse_calls_without_the_secret(self, keyed):
        at = workers(keyed)
        no, wrong, right = (), ((SECRET_METADATA, "guess"),), ((SECRET_METADATA, SECRET),)
        abort = common_pb2.AbortRequest(session_id="someone-elses", reason="probe")
        prefill = prefill_pb2.PrefillRequest(session_id="probe", request_id="probe", token_ids=PROMPT)
        decode = decode_pb2.DecodeRequest(session_id="someone-elses", request_id="probe", token_ids=PROMPT)
        with (
            grpc.insecure_channel(at["kvstore"]) as to_kvstore,
            grpc.insecure_channel(at["prefill"]) as to_prefill,
            grpc.insecure_channel(at["decode"]) as to_decode,
        ):
            kvstore = kvstore_pb2_grpc.KVStoreStub(to_kvstore)
            prefill_stub, decode_stub = prefill_pb2_grpc.PrefillStub(to_prefill), decode_pb2_grpc.DecodeStub(to_decode)
            calls = [
                (kvstore.GetLayout, kvstore_pb2.GetLayoutRequest()),  # the /dev/shm paths, the IPC handles
                (prefill_stub.Prefill, prefill),
                (prefill_stub.Abort, abort),
                (decode_stub.Decode, decode),  # would continue another user's idle session
                (decode_stub.Abort, abort),  # would end another user's running one
            ]
            for metadata in (no, wrong):
                for method, request in calls:
                    code = code_of(method, request, metadata=metadata, timeout=10)
                    assert code == grpc.StatusCode.UNAUTHENTICATED, (method, metadata, code)
        # with the secret: answered (the positive control), and health is open to anyone
        with grpc.insecure_channel(at["kvstore"]) as channel:
            layout = kvstore_pb2_grpc.KVStoreStub(channel).GetLayout(
                kvstore_pb2.GetLayoutRequest(), metadata=right, timeout=10
            )
            assert layout.pool.num_blocks == 64
        with grpc.insecure_channel(at["decode"]) as channel:
            reply = decode_pb2_grpc.DecodeStub(channel).Abort(abort, metadata=right, timeout=10)
            assert reply.found is False
        for address in at.values():
            with grpc.insecure_channel(address) as channel:
                check = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=10)
                assert check.status == health_pb2.HealthCheckResponse.SERVING

    def test_a_preset_secret_is_used_and_shown_nowhere(self, keyed):
        assert secret_stays_in_environments(keyed) == SECRET

    def test_the_gateway_wants_an_api_key(self, keyed):
        with Client(keyed.address) as client:
            assert code_of(client.complete, prompt_token_ids=PROMPT, max_tokens=2) == grpc.StatusCode.UNAUTHENTICATED
        with Client(keyed.address, api_key=CAROL) as client:  # a key, but not one of this gateway's
            assert code_of(client.complete, prompt_token_ids=PROMPT, max_tokens=2) == grpc.StatusCode.UNAUTHENTICATED
        with Client(keyed.address, api_key=BOB) as client:
            reply = client.complete(prompt_token_ids=PROMPT, max_tokens=2, temperature=0.0)
            assert reply.finish.completion_tokens == 2
        with grpc.insecure_channel(keyed.address) as channel:  # load balancers probe without a key
            check = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=10)
            assert check.status == health_pb2.HealthCheckResponse.SERVING
        # the command line: KVRELAY_API_KEY
        without = kvrelay_cli("status", "--address", keyed.address, env={"KVRELAY_API_KEY": ""})
        assert without.returncode == 2 and "UNAUTHENTICATED" in without.stderr, without.stderr
        with_key = kvrelay_cli("status", "--address", keyed.address, "--json", env={"KVRELAY_API_KEY": ALICE})
        assert with_key.returncode == 0, with_key.stderr

    def test_another_keys_session_id_reveals_nothing(self, keyed):
        sid = f"conv-{uuid.uuid4().hex[:8]}"
        with Client(keyed.address, api_key=ALICE) as alice, Client(keyed.address, api_key=BOB) as bob:
            first = alice.complete(prompt_token_ids=PROMPT, max_tokens=2, temperature=0.0, session_id=sid)
            assert first.finish.session_id == sid
            follow_up = PROMPT + list(first.token_ids) + [300, 301]
            # bob sends alice's session id with her conversation: a new session of his, nothing cached
            probe = bob.complete(prompt_token_ids=follow_up, max_tokens=2, temperature=0.0, session_id=sid)
            assert probe.finish.cached_prompt_tokens == 0
            assert probe.finish.session_id == sid
            # alice's conversation is intact: her next turn reuses her KV (the positive control)
            second = alice.complete(prompt_token_ids=follow_up, max_tokens=2, temperature=0.0, session_id=sid)
            assert second.finish.cached_prompt_tokens >= len(PROMPT)

        async def stored():
            async with SessionStore(REDIS_URL, keyed.name) as store:
                return {
                    key: await store.get(f"{session_namespace(key)}.{sid}") for key in (ALICE, BOB)
                }, await store.get(sid)

        by_key, unscoped = asyncio.run(stored())
        assert unscoped is None  # nothing is stored under the id as the client sent it
        assert all(record is not None and record.state == SessionState.IDLE for record in by_key.values())

    def test_shared_memory_is_private(self, keyed):
        for suffix in ("weights", "pool"):
            mode = stat.S_IMODE(shm_path(f"{keyed.name}-{suffix}").stat().st_mode)
            assert mode == 0o600, f"{suffix}: {oct(mode)}"


# --- TLS with client certificates, a generated secret, the session TTL -----------------------------------------------


@pytest.fixture(scope="class")
def tls(tmp_path_factory):
    certs = make_certs(tmp_path_factory.mktemp("certs"))
    d = Deployment(
        "--num-blocks", "64", "--session-ttl", str(TTL_S),
        "--tls-cert", str(certs.server_cert), "--tls-key", str(certs.server_key), "--tls-client-ca", str(certs.ca),
        env={SECRET_ENV: "", "KVRELAY_API_KEYS": f"{CAROL},{ALICE}"},  # no preset secret: kvrelay up makes one
    )  # fmt: skip
    yield d, certs
    assert d.stop() == 0
    assert d.leftovers() == []


class TestTls:
    def test_only_tls_clients_with_a_certificate_get_an_answer(self, tls):
        d, certs = tls
        client_cert = {"tls_cert": certs.client_cert, "tls_key": certs.client_key}
        with Client(d.address, api_key=CAROL, tls_ca=certs.ca, **client_cert) as client:
            reply = client.complete(prompt_token_ids=PROMPT, max_tokens=2, temperature=0.0)
            assert reply.finish.completion_tokens == 2
        for kwargs in ({}, {"tls_ca": certs.ca}, {"tls_ca": certs.other_ca, **client_cert}):
            with Client(d.address, api_key=CAROL, **kwargs) as client:  # plaintext; no certificate; wrong CA
                assert code_of(client.model_info) == grpc.StatusCode.UNAVAILABLE, kwargs
        tls_flags = [
            "--tls-ca",
            str(certs.ca),
            "--tls-cert",
            str(certs.client_cert),
            "--tls-key",
            str(certs.client_key),
        ]
        status = kvrelay_cli("status", "--address", d.address, *tls_flags, env={"KVRELAY_API_KEY": ALICE})
        assert status.returncode == 0, status.stderr
        plain = kvrelay_cli("status", "--address", d.address, env={"KVRELAY_API_KEY": ALICE})
        assert plain.returncode == 2 and "--tls" in plain.stderr, plain.stderr

    def test_a_generated_secret_reaches_every_process_and_nothing_else(self, tls):
        d, _ = tls
        secret = secret_stays_in_environments(d)
        assert secret != SECRET

    def test_the_launchers_folder_is_private(self, tls):
        d, _ = tls
        (folder,) = Path(tempfile.gettempdir()).glob(f"kvrelay-{d.name}-*")  # holds the gateway's health socket
        assert stat.S_IMODE(folder.stat().st_mode) == 0o700
        assert (folder / "gateway.sock").is_socket()

    def test_idle_sessions_expire_after_the_ttl(self, tls):
        d, certs = tls
        sid = f"ttl-{uuid.uuid4().hex[:8]}"
        stored = f"{session_namespace(CAROL)}.{sid}"

        async def record():
            async with SessionStore(REDIS_URL, d.name) as store:
                return await store.get(stored)

        client_cert = {"tls_cert": certs.client_cert, "tls_key": certs.client_key}
        with Client(d.address, api_key=CAROL, tls_ca=certs.ca, **client_cert) as client:
            first = client.complete(prompt_token_ids=PROMPT, max_tokens=2, temperature=0.0, session_id=sid)
            kept_at = time.monotonic()
            held = asyncio.run(record())
            assert held is not None and held.state == SessionState.IDLE and held.tokens_raw  # kept, tokens and all
            deadline = kept_at + TTL_S + 30
            while asyncio.run(record()) is not None:
                assert time.monotonic() < deadline, "the idle session outlived its TTL"
                time.sleep(0.2)
            gone_after = time.monotonic() - kept_at
            assert gone_after >= TTL_S - 0.5  # not before its time (the Redis clock and ours may differ a little)
            follow_up = PROMPT + list(first.token_ids) + [300]
            again = client.complete(prompt_token_ids=follow_up, max_tokens=2, temperature=0.0, session_id=sid)
            assert again.finish.cached_prompt_tokens == 0


# --- without a deployment --------------------------------------------------------------------------------------------


def test_kvrelay_up_refuses_security_files_it_cannot_use(tmp_path):
    name = f"kvtest{os.environ.get('KVRELAY_TEST_RUN', '')}sec{uuid.uuid4().hex[:6]}"
    (tmp_path / "empty").write_text("# no keys yet\n")
    cases = [
        ({"api_keys_file": str(tmp_path / "missing")}, "cannot read"),
        ({"api_keys_file": str(tmp_path / "empty")}, "holds no key"),
        ({"tls_cert": str(tmp_path / "cert.pem")}, "both --tls-cert and --tls-key"),
        ({"tls_client_ca": str(tmp_path / "ca.pem")}, "needs --tls-cert"),
    ]
    for fields, message in cases:
        launcher = Launcher(UpSettings(name=name, **fields))
        with pytest.raises(UsageError, match=message):
            launcher.start()  # before any process starts
        assert launcher.children == []
        launcher.stop()

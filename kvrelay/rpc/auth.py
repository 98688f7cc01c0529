"""Who may call a kvrelay process: the deployment secret (internal services), API keys and TLS (the public gateway).

Both gates are one grpc.aio server interceptor (`Gate`): the standard health and reflection services always pass (load
balancers, `kvrelay up` and grpcurl probe them without credentials); any other call without the right credential is
answered UNAUTHENTICATED before its servicer runs.

- Internal services (kvstore, prefill, decode, colocated) want `kvrelay-deployment-secret` metadata equal to
  KVRELAY_DEPLOYMENT_SECRET. `kvrelay up` generates one per deployment and hands it to its children in the environment,
  never on a command line (`ps` shows every user the command lines; a process's environment only to its owner).
  Internal clients (the gateway's channels to workers, every process's GetLayout) send it from the same variable:
  `kvrelay.rpc.grpc_server.start_server` and `internal_channel` use this module, so no service has a copy of its own.
  With no secret set (a service started by hand), internal services stay open and say so once in the log.
- The gateway wants `authorization: Bearer <key>` with one of the keys of --api-keys-file and KVRELAY_API_KEYS; with
  none configured it is open, as before keys existed (logged at start). Sessions are scoped to the key that created
  them (`ApiKeys.scoped_session_id`).

Comparisons are constant-time: hmac.compare_digest over SHA-256 digests (equal lengths, so not even a key's length
leaks), against every key without stopping at a match.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import os
import secrets
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

import grpc

from kvrelay.ids import SESSION_NAMESPACE_CHARS

log = logging.getLogger("kvrelay.auth")

SECRET_ENV = "KVRELAY_DEPLOYMENT_SECRET"
SECRET_METADATA = "kvrelay-deployment-secret"
API_KEYS_ENV = "KVRELAY_API_KEYS"
AUTHORIZATION = "authorization"
# Methods every caller may use: "/<service>/<method>" of the standard health and reflection services.
OPEN_METHOD_PREFIXES = ("/grpc.health.v1.Health/", "/grpc.reflection.")
# A session's namespace under an API key: this many hex digits of an HMAC of the key (64 bits: no two keys collide).
NAMESPACE_HEX = SESSION_NAMESPACE_CHARS - 1  # and a '.'
SHORT_KEY = 16  # characters: keys shorter than this are warned about (a guessable key is no key)

NO_SECRET = (
    "this is an internal kvrelay service: calls need the deployment's secret in 'kvrelay-deployment-secret' metadata "
    f"(the processes of one deployment share {SECRET_ENV}, which `kvrelay up` sets)"
)
WRONG_SECRET = f"wrong deployment secret: this internal kvrelay service belongs to a deployment of another {SECRET_ENV}"
NO_KEY = (
    "missing API key: this gateway wants 'authorization: Bearer <key>' metadata "
    "(kvrelay.Client(api_key=...), or KVRELAY_API_KEY for the kvrelay command)"
)
NOT_BEARER = "the authorization metadata must be 'Bearer <key>'"
WRONG_KEY = "invalid API key"


class SecurityConfigError(ValueError):
    """A security setting cannot be used (a missing file, a keys file without keys, a key without a certificate)."""


def _digest(text: str) -> bytes:
    return hashlib.sha256(text.encode()).digest()


def _metadata_value(metadata: Iterable | None, name: str) -> str | None:
    for key, value in metadata or ():
        if key == name:
            return value.decode(errors="replace") if isinstance(value, bytes) else value
    return None


# --- the server side -------------------------------------------------------------------------------------------------


def _refusing(handler: grpc.RpcMethodHandler | None, message: str) -> grpc.RpcMethodHandler:
    """A handler of the same shape as `handler` that answers UNAUTHENTICATED without reading a request."""

    async def refuse(request_or_iterator, context) -> None:
        await context.abort(grpc.StatusCode.UNAUTHENTICATED, message)

    if handler is None:  # no such method: refused the same, so an unauthenticated caller learns nothing about names
        return grpc.unary_unary_rpc_method_handler(refuse)
    make = {
        (False, False): grpc.unary_unary_rpc_method_handler,
        (False, True): grpc.unary_stream_rpc_method_handler,
        (True, False): grpc.stream_unary_rpc_method_handler,
        (True, True): grpc.stream_stream_rpc_method_handler,
    }[(bool(handler.request_streaming), bool(handler.response_streaming))]
    return make(
        refuse, request_deserializer=handler.request_deserializer, response_serializer=handler.response_serializer
    )


class Gate(grpc.aio.ServerInterceptor):
    """Health and reflection pass; any other call passes only when `refusal(metadata)` is None, and is answered
    UNAUTHENTICATED with that message otherwise."""

    def refusal(self, metadata: Iterable | None) -> str | None:
        raise NotImplementedError

    async def intercept_service(self, continuation, handler_call_details):
        handler = await continuation(handler_call_details)
        if handler_call_details.method.startswith(OPEN_METHOD_PREFIXES):
            return handler
        message = self.refusal(handler_call_details.invocation_metadata)
        return handler if message is None else _refusing(handler, message)


class SecretGate(Gate):
    """An internal service's gate: the deployment secret."""

    def __init__(self, secret: str) -> None:
        if not secret:
            raise ValueError("an empty deployment secret")
        self._digest = _digest(secret)

    def refusal(self, metadata: Iterable | None) -> str | None:
        given = _metadata_value(metadata, SECRET_METADATA)
        if given is None:
            return NO_SECRET
        return None if hmac.compare_digest(_digest(given), self._digest) else WRONG_SECRET


def deployment_secret(env: Mapping[str, str] | None = None) -> str | None:
    """This process's deployment secret (KVRELAY_DEPLOYMENT_SECRET), None when unset or empty."""
    value = (os.environ if env is None else env).get(SECRET_ENV, "").strip()
    return value or None


def new_deployment_secret() -> str:
    return secrets.token_urlsafe(32)  # 256 bits


_warned_open = False


def internal_server_interceptors(secret: str | None = None) -> list[grpc.aio.ServerInterceptor]:
    """The gate of an internal service: the deployment secret (given, or from the environment). Without one the
    service stays open, as services started by hand always were, and says so once per process."""
    global _warned_open
    secret = secret or deployment_secret()
    if secret is not None:
        return [SecretGate(secret)]
    if not _warned_open:
        _warned_open = True
        log.warning(
            "%s is not set: this internal service answers anyone who can reach its port "
            "(`kvrelay up` sets one per deployment; set the same value in every process of a deployment started by "
            "hand)",
            SECRET_ENV,
        )
    return []


# --- the client side -------------------------------------------------------------------------------------------------


def _with_metadata(details: grpc.aio.ClientCallDetails, pairs: Sequence[tuple[str, str]]) -> grpc.aio.ClientCallDetails:
    metadata = grpc.aio.Metadata(*tuple(details.metadata or ()))
    for key, value in pairs:
        metadata.add(key, value)
    return grpc.aio.ClientCallDetails(
        details.method, details.timeout, metadata, details.credentials, details.wait_for_ready
    )


class _UnaryUnary(grpc.aio.UnaryUnaryClientInterceptor):
    def __init__(self, pairs: Sequence[tuple[str, str]]) -> None:
        self.pairs = tuple(pairs)

    async def intercept_unary_unary(self, continuation, client_call_details, request):
        return await continuation(_with_metadata(client_call_details, self.pairs), request)


class _UnaryStream(grpc.aio.UnaryStreamClientInterceptor):
    def __init__(self, pairs: Sequence[tuple[str, str]]) -> None:
        self.pairs = tuple(pairs)

    async def intercept_unary_stream(self, continuation, client_call_details, request):
        return await continuation(_with_metadata(client_call_details, self.pairs), request)


class _StreamUnary(grpc.aio.StreamUnaryClientInterceptor):
    def __init__(self, pairs: Sequence[tuple[str, str]]) -> None:
        self.pairs = tuple(pairs)

    async def intercept_stream_unary(self, continuation, client_call_details, request_iterator):
        return await continuation(_with_metadata(client_call_details, self.pairs), request_iterator)


class _StreamStream(grpc.aio.StreamStreamClientInterceptor):
    def __init__(self, pairs: Sequence[tuple[str, str]]) -> None:
        self.pairs = tuple(pairs)

    async def intercept_stream_stream(self, continuation, client_call_details, request_iterator):
        return await continuation(_with_metadata(client_call_details, self.pairs), request_iterator)


def metadata_interceptors(pairs: Sequence[tuple[str, str]]) -> list[grpc.aio.ClientInterceptor]:
    """grpc.aio client interceptors that add `pairs` to the metadata of every call of a channel (one per call shape:
    a grpc.aio channel files an interceptor under the first shape it implements only)."""
    return [cls(pairs) for cls in (_UnaryUnary, _UnaryStream, _StreamUnary, _StreamStream)]


def internal_client_interceptors(secret: str | None = None) -> list[grpc.aio.ClientInterceptor]:
    """What a channel to an internal service sends with every call: the deployment secret, when there is one."""
    secret = secret or deployment_secret()
    return metadata_interceptors([(SECRET_METADATA, secret)]) if secret else []


def bearer_metadata(api_key: str) -> tuple[str, str]:
    return (AUTHORIZATION, f"Bearer {api_key}")


# --- API keys --------------------------------------------------------------------------------------------------------


def session_namespace(api_key: str) -> str:
    """The namespace of a key's sessions: a one-way function of the key (Redis and logs show it, never the key)."""
    return hmac.new(b"kvrelay session namespace", api_key.encode(), hashlib.sha256).hexdigest()[:NAMESPACE_HEX]


def _parse_keys_file(path: str) -> list[str]:
    """One key per line; '#' starts a comment (keys never contain '#'); blank lines are skipped."""
    try:
        text = Path(path).read_text()
    except OSError as exc:
        raise SecurityConfigError(f"cannot read the API keys file {path}: {exc.strerror or exc}") from None
    keys = []
    for number, line in enumerate(text.splitlines(), 1):
        key = line.split("#", 1)[0].strip()
        if not key:
            continue
        if any(c.isspace() for c in key):
            raise SecurityConfigError(f"{path}, line {number}: an API key cannot contain whitespace (one key a line)")
        keys.append(key)
    if not keys:
        raise SecurityConfigError(f"the API keys file {path} holds no key (one key a line, '#' comments)")
    return keys


class ApiKeys:
    """The gateway's API keys (--api-keys-file and KVRELAY_API_KEYS together). Empty: the gateway is open."""

    def __init__(self, keys: Iterable[str] = (), source: str = "") -> None:
        unique = list(dict.fromkeys(keys))
        self.source = source
        # (digest, namespace): the keys themselves are not kept
        self._keys = [(_digest(k), session_namespace(k)) for k in unique]
        self.short = sum(len(k) < SHORT_KEY for k in unique)

    @classmethod
    def load(cls, path: str | None, env: Mapping[str, str] | None = None) -> ApiKeys:
        """Keys from the file (when given: it must hold at least one) and the comma-separated variable.
        SecurityConfigError for an unreadable or empty file."""
        env = os.environ if env is None else env
        keys, sources = [], []
        if path:
            keys += _parse_keys_file(path)
            sources.append(path)
        from_env = [k.strip() for k in env.get(API_KEYS_ENV, "").split(",") if k.strip()]
        if from_env:
            if any(any(c.isspace() for c in k) for k in from_env):
                raise SecurityConfigError(f"{API_KEYS_ENV}: an API key cannot contain whitespace (comma-separated)")
            keys += from_env
            sources.append(API_KEYS_ENV)
        return cls(keys, " and ".join(sources))

    def __len__(self) -> int:
        return len(self._keys)

    def describe(self) -> str:
        """The gateway's start-up line about keys (never a key)."""
        if not self._keys:
            return (
                "no API keys configured (--api-keys-file, KVRELAY_API_KEYS): the gateway answers anyone who can reach "
                "it, and anyone who knows a session id can continue that session"
            )
        short = f"; {self.short} shorter than {SHORT_KEY} characters (guessable)" if self.short else ""
        return f"{len(self._keys)} API key(s) from {self.source}; health and reflection stay open{short}"

    def namespace(self, metadata: Iterable | None) -> str | None:
        """The session namespace of the key in `authorization: Bearer <key>`, None for no or a wrong key.
        Constant-time: every key is compared, each in constant time."""
        value = _metadata_value(metadata, AUTHORIZATION)
        if value is None:
            return None
        scheme, _, token = value.strip().partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            return None
        given = _digest(token.strip())
        found = None
        for digest, namespace in self._keys:
            if hmac.compare_digest(given, digest):
                found = namespace  # no break: the time taken does not depend on which key matched
        return found

    def refusal(self, metadata: Iterable | None) -> str | None:
        """Why a call with this metadata is refused (None: it is not)."""
        value = _metadata_value(metadata, AUTHORIZATION)
        if value is None:
            return NO_KEY
        scheme, _, token = value.strip().partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            return NOT_BEARER
        return None if self.namespace(metadata) is not None else WRONG_KEY

    async def scoped_session_id(self, context: grpc.aio.ServicerContext, session_id: str) -> str:
        """The id a session is stored under: with keys, `<namespace of the caller's key>.<session_id>`, so a session
        id sent with another key names another session (a new one) and tells nothing about the first; without keys,
        session_id itself (anyone who knows a session id can continue that session)."""
        if not self._keys:
            return session_id
        namespace = self.namespace(context.invocation_metadata())
        if namespace is None:  # the gate let it through, so this does not happen; refuse rather than share
            await context.abort(grpc.StatusCode.UNAUTHENTICATED, WRONG_KEY)
        return f"{namespace}.{session_id}"

    def client_session_id(self, stored_id: str) -> str:
        """The session id the client knows (scoped_session_id undone)."""
        return stored_id.split(".", 1)[1] if self._keys else stored_id


class ApiKeyGate(Gate):
    """The gateway's gate: an API key."""

    def __init__(self, keys: ApiKeys) -> None:
        self.keys = keys

    def refusal(self, metadata: Iterable | None) -> str | None:
        return self.keys.refusal(metadata)


# --- TLS -------------------------------------------------------------------------------------------------------------


def _read(path: str | os.PathLike, what: str) -> bytes:
    try:
        return Path(path).read_bytes()
    except OSError as exc:
        raise SecurityConfigError(f"cannot read the {what} {path}: {exc.strerror or exc}") from None


def server_tls_credentials(
    cert: str | None, key: str | None, client_ca: str | None = None
) -> grpc.ServerCredentials | None:
    """TLS for the gateway's port: its certificate chain and key (PEM); with client_ca, clients must present a
    certificate signed by it (mutual TLS). None without a certificate (plaintext)."""
    if not cert and not key:
        if client_ca:
            raise SecurityConfigError("--tls-client-ca needs --tls-cert and --tls-key (client certificates need TLS)")
        return None
    if not cert or not key:
        raise SecurityConfigError("TLS needs both --tls-cert and --tls-key")
    ca = _read(client_ca, "TLS client CA file") if client_ca else None
    pair = (_read(key, "TLS key file"), _read(cert, "TLS certificate file"))
    return grpc.ssl_server_credentials([pair], root_certificates=ca, require_client_auth=ca is not None)


def client_tls_credentials(
    ca: str | os.PathLike | None = None, cert: str | os.PathLike | None = None, key: str | os.PathLike | None = None
) -> grpc.ChannelCredentials:
    """TLS for a client: trust `ca` (PEM; None: the system's roots), and present cert/key when the server asks."""
    if bool(cert) != bool(key):
        raise SecurityConfigError("a client certificate needs both --tls-cert and --tls-key")
    return grpc.ssl_channel_credentials(
        root_certificates=_read(ca, "TLS CA file") if ca else None,
        private_key=_read(key, "TLS key file") if key else None,
        certificate_chain=_read(cert, "TLS certificate file") if cert else None,
    )

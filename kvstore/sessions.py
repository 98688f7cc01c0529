"""Redis-backed session store: block free-list, session records and block tables, leases, idle LRU, worker registry.

Redis holds all of this (nothing in process memory is the source of truth), so every process of a
deployment — gateway, prefill and decode workers, kvstore — sees one pool. Every state change is one Lua script
(kvstore/lua/, one per operation): Redis runs a script atomically, so two workers can never take the same block and
a failed allocation takes nothing. Times (leases, worker expiry, LRU) come from the Redis server's clock, so workers
on hosts whose clocks disagree still agree on who has expired. ARCHITECTURE.md ("Redis schema") describes every key.

Ownership protocol (who may change a session):
- `allocate` creates a session owned by the caller (PREFILLING) or appends blocks to one the caller owns.
- `update` and `release` are for the owner only (`NotOwner` otherwise).
- `adopt` transfers ownership: prefill -> decode hand-off (a PREFILLED session is offered to any adopter),
  resume after a worker died (its lease expired, or with `takeover` its registry entry is gone), reuse of an IDLE
  session, or `force`.
- `renew_leases` extends only sessions the owner is working on (PREFILLING, DECODING): a PREFILLED session's lease
  is the hand-off deadline, so a cancel between prefill and decode leaks its blocks for at most one lease.
- `reclaim_expired` frees sessions whose lease ran out; somebody (the kvstore service) calls it periodically.

Hand-off notice: `update(..., PREFILLED)` also publishes the session id on the pub/sub channel `{prefix}:prefilled`
(`handoffs()` listens), so a decode worker that already holds the request adopts the session the moment it
is offered. A notice is only a hint to try `adopt` now: a lost one costs latency, never correctness.

Claimed hand-off (one round trip fewer): a decode worker that waits for its request's session calls `adopt` with
`claim_ms`; when the session is not offered yet, the failed call leaves a claim (`{prefix}:claim:{sid}`), and
prefill's `update(..., PREFILLED)` then hands the session to the claimer in the same script and publishes its record
on `{prefix}:adopted:{owner}` (`handoffs(owner)` listens). A lost announcement costs latency only: the claimer's next
`adopt` returns the session handed to it; a call that gives up calls `unclaim`, which also frees a session handed to
it meanwhile.

Redis faults. Every call is bounded: a reply waits at most SOCKET_TIMEOUT_S (a stopped Redis cannot hang a call), and
a call that cannot reach Redis is retried with backoff for retry_s, then raises StoreUnavailable ("session store
unreachable at redis://:***@host:port ..."). Retrying is safe because every script is harmless to repeat: a reply
lost after the script ran (a timeout, a reset) makes the caller run it again (allocate takes `have`, update, adopt
and release recognise their own repeat). Redis that loses its state (a restart without persistence, a FLUSHALL) is
recovered from the living: the kvstore re-creates the pool under a new epoch (`recover_pool`), every live worker
re-asserts what it holds (`reassert`), and the free-list is rebuilt from the rest (kvstore/lua/recover_pool.lua has
the protocol).
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections import Counter, defaultdict
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from enum import Enum
from functools import cache
from importlib import resources
from typing import Any, NoReturn, TypeVar
from urllib.parse import urlsplit, urlunsplit

import redis.asyncio as aioredis
from redis.exceptions import AuthenticationError, ResponseError
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from kvrelay.ids import check_id
from kvstore.allocator import OutOfBlocks

__all__ = [
    "AuditReport",
    "HeldSession",
    "NotOwner",
    "OutOfBlocks",
    "PoolGeometryMismatch",
    "PoolNotInitialized",
    "PoolRecovering",
    "PoolState",
    "RecoveryClosed",
    "PoolStats",
    "SessionError",
    "SessionNotFound",
    "SessionRecord",
    "SessionState",
    "SessionStore",
    "StoreUnavailable",
    "WorkerInfo",
    "WrongState",
]


def masked(url: str) -> str:
    """The Redis URL with its password replaced by ***: what logs and error messages may print."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    host = parts.netloc.rsplit("@", 1)[1]
    return urlunsplit(parts._replace(netloc=f"{parts.username or ''}:***@{host}"))


class SessionState(str, Enum):
    PREFILLING = "PREFILLING"  # a prefill worker is computing its K/V
    PREFILLED = "PREFILLED"  # K/V written and the stream synchronized; offered to a decode worker
    DECODING = "DECODING"  # a decode worker is generating
    FINISHED = "FINISHED"  # generation ended; to be freed or released
    IDLE = "IDLE"  # kept for the next turn; no owner, no lease; evictable LRU


ACTIVE_STATES = frozenset({SessionState.PREFILLING, SessionState.PREFILLED, SessionState.DECODING})


class SessionError(Exception):
    """The store refused an operation; nothing was changed."""


class NotOwner(SessionError):
    """The caller does not own the session (it may have been adopted after the caller's lease expired)."""


class SessionNotFound(SessionError, LookupError):
    """No such session (never created, freed, reclaimed or evicted)."""


class WrongState(SessionError):
    """The session is not in the state the caller expected."""


class PoolGeometryMismatch(SessionError, ValueError):
    """init_pool found a pool of another geometry under the prefix."""


class PoolNotInitialized(SessionError):
    """No pool under the prefix: call init_pool first (or, after Redis lost its state, wait for the kvstore)."""


class PoolRecovering(SessionError):
    """Redis lost its state and the pool waits for live workers to re-assert what they hold: no allocation until then
    (a second or few; see recover_pool)."""


class RecoveryClosed(SessionError):
    """reassert came after the recovery window: the caller's sessions were not kept and must be dropped unseen."""


class StoreUnavailable(RedisConnectionError):
    """Redis did not answer within the store's retry budget. A redis ConnectionError, so every handler that treats
    Redis errors as UNAVAILABLE does so; its message names the store's URL (password masked)."""


# What a session-store failure tells a client: the gateway recognises the words, and does not take a worker that
# says them for a dead one (another would fail the same way).
STORE_UNREACHABLE = "session store unreachable"


@dataclass(frozen=True)
class SessionRecord:
    session_id: str
    state: SessionState
    owner: str | None
    num_tokens: int  # tokens whose K/V are in the pool
    first_token: int | None
    request_id: str | None
    created_ms: int
    updated_ms: int
    lease_expires_ms: int | None
    block_table: tuple[int, ...]
    # the `tokens` field as stored (update(tokens=...)), parsed only on demand by token_ids(): the hand-off adopts
    # a session without needing them, the next turn's prefill compares them with its prompt
    tokens_raw: str = field(default="", repr=False)

    def token_ids(self) -> list[int]:
        return [int(t) for t in self.tokens_raw.split(",")] if self.tokens_raw else []


@dataclass(frozen=True)
class HeldSession:
    """A session as the worker holding it knows it, for reassert after Redis lost its state."""

    session_id: str
    state: SessionState
    num_tokens: int  # tokens whose K/V the worker has written (0 while prefilling: trusted only once PREFILLED)
    request_id: str | None
    block_table: tuple[int, ...]


@dataclass(frozen=True)
class PoolState:
    epoch: str  # the pool's random id; "" when there is no pool (Redis lost its state, not re-created yet)
    recovering: bool  # re-created, waiting for re-asserts (allocation refused meanwhile)


@dataclass(frozen=True)
class WorkerInfo:
    worker_id: str
    role: str
    address: str
    info: Mapping[str, Any]  # static, from register_worker (model, pool format, ...)
    load: Mapping[str, Any]  # from the latest heartbeat, e.g. {"active": 3, "queued": 1}
    registered_ms: int
    heartbeat_ms: int
    expires_ms: int


@dataclass(frozen=True)
class PoolStats:
    num_blocks: int
    block_size: int
    free: int
    used: int
    active_sessions: int  # every session that is not IDLE (its blocks are pinned until freed or reclaimed)
    idle_sessions: int


@dataclass(frozen=True)
class AuditReport:
    ok: bool
    message: str
    problems: tuple[str, ...]


# Connections to Redis per SessionStore (per process: every process has one store). A call holds one only while
# Redis answers it (well under a millisecond), so 64 serve thousands of concurrent streams; beyond that calls wait.
MAX_CONNECTIONS = 64
# How long a call waits for a free connection before it fails (redis ConnectionError -> UNAVAILABLE at the API).
POOL_TIMEOUT_S = 10.0
# One reply, or one connection attempt, waits at most this long: a stopped (SIGSTOP) or unreachable Redis fails the
# attempt instead of hanging it. Far above any reply kvrelay waits for (a script runs in well under a millisecond;
# the audit of a big pool in tens).
SOCKET_TIMEOUT_S = 2.0
# A call that cannot reach Redis (refused, reset, timed out, still loading its AOF) is retried with backoff (0.05 s
# doubling to 1 s) for this long, then StoreUnavailable: a Redis restart (about a second) or a pause of a few seconds
# costs a pause, a Redis that stays away a clear error within seconds.
RETRY_S = 8.0
FIRST_BACKOFF_S = 0.05
MAX_BACKOFF_S = 1.0
# After Redis lost its state, how long the re-created pool waits for live workers to re-assert what they hold before
# the rest becomes free: several heartbeats (services/common/worker.py HEARTBEAT_S = 1 s) and a retry's backoff.
RECOVERY_WINDOW_MS = 3_000

T = TypeVar("T")

# Fields of the session hash that update() may set, with their encoders ('' stores None).
_UPDATABLE = {
    "num_tokens": lambda v: str(int(v)),
    "first_token": lambda v: "" if v is None else str(int(v)),
    "request_id": lambda v: "" if v is None else str(v),
    # the token ids whose K/V the blocks hold, kept with an IDLE session so the next turn can find the shared prefix
    "tokens": lambda v: ",".join(str(int(t)) for t in v),
}
_SCRIPTS = (
    "init_pool",
    "recover_pool",
    "reassert",
    "allocate",
    "update",
    "adopt",
    "unclaim",
    "free",
    "renew_leases",
    "reclaim_expired",
    "release",
    "evict_lru",
    "expire_idle",
    "register_worker",
    "heartbeat",
    "deregister_worker",
    "list_workers",
    "stats",
    "audit",
)


@cache
def _script_source(name: str) -> str:
    lua = resources.files("kvstore") / "lua"
    return (lua / "_lib.lua").read_text() + "\n" + (lua / f"{name}.lua").read_text()


def _glob_escape(text: str) -> str:
    """Escapes SCAN MATCH's glob characters, so a prefix like "kv[1]" matches itself only."""
    return "".join("\\" + c if c in "*?[]\\" else c for c in text)


def _check_id(kind: str, value: str) -> None:
    # The ids every kvrelay process accepts (kvrelay/ids.py): ':' separates key parts, so a session id "a:blocks"
    # would alias the block table of session "a". InvalidId is a ValueError.
    check_id(kind, value)


def _check_positive(name: str, value: int) -> None:
    if value <= 0:
        raise ValueError(f"{name} must be positive, got {value}")


def _opt_int(text: str | None) -> int | None:
    return int(text) if text else None


def _pairs(flat: list[str]) -> dict[str, str]:
    return dict(zip(flat[::2], flat[1::2], strict=True))


def _raise(err: ResponseError) -> NoReturn:
    """Maps a script's KVRELAY_<CODE> error reply to the exception callers catch."""
    code, _, detail = str(err).partition(" ")
    if code == "KVRELAY_OOB":
        needed, free = detail.split()
        raise OutOfBlocks(needed=int(needed), free=int(free)) from None
    if code == "KVRELAY_NOTOWNER":
        raise NotOwner(detail) from None
    if code == "KVRELAY_NOSESSION":
        raise SessionNotFound(detail) from None
    if code == "KVRELAY_STATE":
        raise WrongState(detail) from None
    if code == "KVRELAY_CAPACITY":
        raise ValueError(detail) from None
    if code == "KVRELAY_NOPOOL":
        raise PoolNotInitialized(f"no KV block pool under prefix {detail!r}: call init_pool first") from None
    if code == "KVRELAY_RECOVERING":
        raise PoolRecovering(f"the pool of prefix {detail!r} is recovering from lost Redis state") from None
    if code == "KVRELAY_CLOSED":
        raise RecoveryClosed(detail) from None
    if code == "KVRELAY_DIRTY":
        raise SessionError(f"{detail}; wipe them with init_pool(..., reset=True)") from None
    raise err


def _block_ids(raw: str | list[str]) -> list[int]:
    """Block ids from a script's comma-separated reply ("" for none) or from a LRANGE."""
    if isinstance(raw, str):
        return [int(b) for b in raw.split(",")] if raw else []
    return [int(b) for b in raw]


def _record(session_id: str, fields: dict[str, str], blocks: str | list[str]) -> SessionRecord:
    return SessionRecord(
        session_id=session_id,
        state=SessionState(fields["state"]),
        owner=fields.get("owner") or None,
        num_tokens=int(fields.get("num_tokens") or 0),
        first_token=_opt_int(fields.get("first_token")),
        request_id=fields.get("request_id") or None,
        created_ms=int(fields.get("created_ms") or 0),
        updated_ms=int(fields.get("updated_ms") or 0),
        lease_expires_ms=_opt_int(fields.get("lease_expires_ms")),
        block_table=tuple(_block_ids(blocks)),
        tokens_raw=fields.get("tokens") or "",
    )


class SessionStore:
    """One deployment's sessions and KV block pool in Redis; every key starts with f"{prefix}:"."""

    def __init__(
        self,
        redis_url: str,
        prefix: str = "kvrelay",
        *,
        max_connections: int = MAX_CONNECTIONS,
        pool_timeout_s: float = POOL_TIMEOUT_S,
        retry_s: float = RETRY_S,
    ) -> None:
        """max_connections bounds this store's connections to Redis; a call that finds them all busy waits up to
        pool_timeout_s for one, then raises redis.exceptions.ConnectionError ("No connection available."). A call
        that cannot reach Redis is retried for retry_s, then raises StoreUnavailable (0: one attempt)."""
        if not prefix or prefix != prefix.strip():
            raise ValueError(f"invalid key prefix {prefix!r}")
        _check_positive("max_connections", max_connections)
        self.prefix = prefix
        self.url = masked(redis_url)
        self.retry_s = retry_s
        # Blocking, not redis-py's default pool: that one raises MaxConnectionsError as soon as every connection is
        # busy (100 in redis-py 8), which failed a quarter of the streams of a gateway past ~200 concurrent ones.
        # Here a burst queues for a connection instead; only a Redis that stays too slow for pool_timeout_s fails.
        pool = aioredis.BlockingConnectionPool.from_url(
            redis_url,
            decode_responses=True,
            max_connections=max_connections,
            timeout=pool_timeout_s,
            socket_timeout=SOCKET_TIMEOUT_S,
            socket_connect_timeout=SOCKET_TIMEOUT_S,
        )
        self._redis = aioredis.Redis.from_pool(pool)  # from_pool: closing the client closes the pool
        self._scripts = {name: self._redis.register_script(_script_source(name)) for name in _SCRIPTS}

    @classmethod
    async def connect(cls, redis_url: str, prefix: str = "kvrelay", **pool: Any) -> SessionStore:
        """A store whose Redis answered a PING (fails fast with the URL in the message otherwise); `pool`: the
        constructor's max_connections and pool_timeout_s."""
        store = cls(redis_url, prefix, **pool)
        try:
            await store._redis.ping()
        except Exception as exc:
            await store.close()
            raise ConnectionError(f"cannot reach Redis at {masked(redis_url)}: {exc}") from exc
        return store

    async def close(self) -> None:
        await self._redis.aclose()

    async def __aenter__(self) -> SessionStore:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    def key(self, *parts: str) -> str:
        """The full name of a key of this prefix, e.g. key("session", sid, "blocks")."""
        return ":".join((self.prefix, *parts))

    @property
    def redis(self):
        """The client of this store's bounded pool, for a deployment's other small keys (services/split/board.py)."""
        return self._redis

    async def _retrying(self, what: str, call: Callable[[], Awaitable[T]]) -> T:
        """call(), again with backoff while Redis cannot be reached, for retry_s at most (see the module docstring:
        every call is harmless to repeat). Then StoreUnavailable. A wrong password is not retried."""
        deadline = time.monotonic() + self.retry_s
        delay = FIRST_BACKOFF_S
        while True:
            try:
                return await call()
            except (RedisConnectionError, RedisTimeoutError) as exc:
                if isinstance(exc, StoreUnavailable | AuthenticationError):
                    raise
                left = deadline - time.monotonic()
                if left <= 0:
                    raise StoreUnavailable(
                        f"{STORE_UNREACHABLE} at {self.url} ({what}, retried for {self.retry_s:g} s: "
                        f"{type(exc).__name__}: {exc})"
                    ) from exc
                await asyncio.sleep(min(delay, left))
                delay = min(2 * delay, MAX_BACKOFF_S)

    async def _run(self, name: str, *args: object) -> Any:
        script = self._scripts[name]
        try:
            return await self._retrying(name, lambda: script(keys=[], args=[self.prefix, *args]))
        except ResponseError as err:
            _raise(err)

    async def ping(self) -> None:
        """One PING, not retried (raises a redis ConnectionError or TimeoutError): health checks ask this."""
        await self._redis.ping()

    # -- pool -----------------------------------------------------------------------------------------------------

    async def init_pool(self, num_blocks: int, block_size: int, reset: bool = False) -> bool:
        """Creates the free-list 0..num_blocks-1 once; returns True when it created it.

        An existing pool of the same geometry is kept (a restarted gateway or worker must not hand out blocks that
        live sessions hold); another geometry raises PoolGeometryMismatch. reset=True wipes every key of the prefix
        first — what the kvstore service must do when it allocates fresh device memory, because the K/V that the
        sessions in Redis point at did not survive.
        """
        _check_positive("num_blocks", num_blocks)
        _check_positive("block_size", block_size)
        if reset:
            await self.wipe()
        try:
            return bool(await self._run("init_pool", num_blocks, block_size, uuid.uuid4().hex[:16]))
        except ResponseError as err:
            code, _, detail = str(err).partition(" ")
            if code != "KVRELAY_GEOMETRY":
                raise
            have_blocks, have_size = detail.split()
            raise PoolGeometryMismatch(
                f"prefix {self.prefix!r} holds a pool of {have_blocks} blocks x {have_size} tokens, not "
                f"{num_blocks} x {block_size}; pass reset=True to wipe it (and every session) or use another prefix"
            ) from None

    async def recover_pool(self, num_blocks: int, block_size: int, window_ms: int = RECOVERY_WINDOW_MS) -> str:
        """The kvstore's periodic check that Redis still holds the pool (kvstore/lua/recover_pool.lua has the
        protocol). Returns "ok"; "recreated" when Redis had lost it (re-created under a new epoch, waiting window_ms
        for live workers to reassert); "recovering" meanwhile; "recovered" when the window closed just now (the
        blocks nobody re-asserted are free)."""
        _check_positive("window_ms", window_ms)
        try:
            what, _epoch = await self._run("recover_pool", num_blocks, block_size, window_ms, uuid.uuid4().hex[:16])
        except ResponseError as err:
            raise PoolGeometryMismatch(f"prefix {self.prefix!r} holds another pool: {err}") from None
        return what

    async def pool_state(self) -> PoolState:
        """The pool's epoch and whether it is recovering (one HMGET): how a worker tells that Redis lost its state."""
        epoch, until = await self._retrying(
            "pool", lambda: self._redis.hmget(self.key("pool"), "epoch", "recovering_until_ms")
        )
        return PoolState(epoch=epoch or "", recovering=bool(until))

    async def reassert(
        self,
        worker_id: str,
        role: str,
        address: str,
        ttl_ms: int,
        lease_ms: int,
        sessions: list[HeldSession],
        info: Mapping[str, Any] | None = None,
    ) -> list[str]:
        """After Redis lost its state: registers the worker and re-creates the sessions it holds (owner, state,
        num_tokens, request_id, block table, a lease of lease_ms), atomically. Returns the ids refused (another
        worker re-asserted them, or their blocks): the caller drops those without touching them.
        PoolNotInitialized: the kvstore has not re-created the pool yet; RecoveryClosed: too late."""
        _check_id("worker id", worker_id)
        _check_positive("ttl_ms", ttl_ms)
        _check_positive("lease_ms", lease_ms)
        args: list[object] = [worker_id, role, address, ttl_ms, json.dumps(dict(info or {})), lease_ms]
        for held in sessions:
            state = SessionState(held.state).value
            blocks = ",".join(str(int(b)) for b in held.block_table)
            args += [held.session_id, state, int(held.num_tokens), held.request_id or "", blocks]
        return list(await self._run("reassert", *args))

    async def wipe(self) -> int:
        """Deletes every key of the prefix (SCAN, not KEYS, so Redis keeps serving). Returns the number deleted."""
        deleted = 0
        batch: list[str] = []
        async for key in self._redis.scan_iter(match=_glob_escape(self.prefix) + ":*", count=1000):
            batch.append(key)
            if len(batch) >= 1000:
                deleted += await self._redis.unlink(*batch)
                batch.clear()
        if batch:
            deleted += await self._redis.unlink(*batch)
        return deleted

    # -- sessions -------------------------------------------------------------------------------------------------

    async def allocate(
        self,
        session_id: str,
        n: int,
        owner: str,
        lease_ms: int,
        evict: bool = True,
        *,
        create: bool = True,
        request_id: str | None = None,
        have: int | None = None,
    ) -> list[int]:
        """Takes n free blocks and appends them to the session's block table; returns them in table order.

        Creates the session (PREFILLING, owned by `owner`) if missing; an existing one must be owned by `owner`
        (NotOwner). The lease restarts at lease_ms. With evict, idle sessions are evicted (LRU first) when the
        free-list is short. All or nothing: OutOfBlocks(needed, free) takes and evicts nothing; its `free` counts
        the blocks this call could have had (free-list plus, with evict, the idle sessions' blocks). Pass
        create=False when growing a session you believe you own: SessionNotFound then tells a stalled worker that its
        session was reclaimed instead of silently starting a new one. request_id is recorded on a session this call
        creates (a retry of the request may take the half-prefilled session over; see adopt's takeover). have: the
        number of blocks the caller's table holds, which makes the call harmless to repeat (a repeat after a lost
        reply returns the blocks the first run took). PoolRecovering while Redis recovers from lost state.
        """
        _check_id("session id", session_id)
        _check_id("owner", owner)
        if n < 0:
            raise ValueError(f"cannot allocate a negative number of blocks ({n})")
        _check_positive("lease_ms", lease_ms)
        args = (session_id, n, owner, lease_ms, int(evict), int(create), request_id or "", "" if have is None else have)
        return _block_ids(await self._run("allocate", *args))

    async def update(
        self,
        session_id: str,
        owner: str,
        state: SessionState | str | None,
        *,
        lease_ms: int | None = None,
        **fields: int | str | None,
    ) -> bool:
        """The owner records progress: state (None keeps it) and num_tokens / first_token / request_id.

        lease_ms restarts the lease, e.g. the prefill worker sets the hand-off deadline when it records PREFILLED.
        num_tokens beyond the block table's capacity raises ValueError. IDLE is set by release(), not here.
        Returns True when PREFILLED handed the session to a decode worker's claim on it (see the module docstring):
        the caller no longer owns it.
        """
        unknown = set(fields) - set(_UPDATABLE)
        if unknown:
            raise TypeError(f"update() cannot set {sorted(unknown)}; settable fields: {sorted(_UPDATABLE)}")
        if state is not None:
            state = SessionState(state)
            if state is SessionState.IDLE:
                raise ValueError("use release() to make a session IDLE (it clears the owner and joins the LRU)")
        if lease_ms is not None:
            _check_positive("lease_ms", lease_ms)
        if "num_tokens" in fields and int(fields["num_tokens"] or 0) < 0:
            raise ValueError(f"num_tokens must be >= 0, got {fields['num_tokens']}")
        args: list[object] = [session_id, owner, state.value if state else "", "" if lease_ms is None else lease_ms]
        for name, value in fields.items():
            args += [name, _UPDATABLE[name](value)]
        return int(await self._run("update", *args)) == 2

    async def adopt(
        self,
        session_id: str,
        new_owner: str,
        lease_ms: int,
        expected_state: SessionState | str | None = None,
        *,
        expected_owner: str | None = None,
        force: bool = False,
        state: SessionState | str = SessionState.DECODING,
        extra_tokens: int = 0,
        expected_request: str | None = None,
        claim_ms: int = 0,
        takeover: bool = False,
        cap_tokens: int | None = None,
        set_request: str | None = None,
    ) -> SessionRecord:
        """Takes over a session and moves it to `state` (DECODING, or PREFILLING to extend an idle one).

        Allowed when the session has no owner (IDLE), is already owned by new_owner (a retry), is owned by
        expected_owner, is PREFILLED (the hand-off: its prefill worker is done with it), or its owner's lease has
        expired (resume after a worker died); or with force. Otherwise NotOwner. expected_state guards the
        current state (WrongState); a FINISHED session is not adopted without force. Returns the record with its
        block table.

        extra_tokens > 0 also grows the block table, in the same atomic step, to hold num_tokens + extra_tokens
        tokens if the free-list has the blocks (never evicting; otherwise the table is returned as it was and the
        adopter grows it with allocate): the decode worker's first step then needs no allocation round trip.
        expected_request guards the record's request_id (WrongState otherwise): a decode worker waiting for its
        request's hand-off never takes another request's session of the same id.

        claim_ms > 0 (with expected_request): when the session is not offered yet (SessionNotFound, WrongState), a
        claim for new_owner is left for claim_ms, so that prefill's update to PREFILLED hands the session over
        itself (announced on `handoffs(new_owner)`); a session already handed over for expected_request is returned
        as adopted. Call `unclaim` when giving up.

        takeover: the caller moves the session off a worker the gateway found dead or stalled (a decode worker
        resuming a stream, a prefill worker retrying a named session's prompt): also allowed when the owner's entry
        in the worker registry is gone, which is safe because a worker stops acting on its sessions before its entry
        can expire (adopt.lua has the argument). cap_tokens lowers num_tokens to at most that (the resumer trusts
        the pool only for the tokens it knows); set_request records the request the session now serves.
        """
        _check_id("owner", new_owner)
        _check_positive("lease_ms", lease_ms)
        target = SessionState(state)
        if target not in (SessionState.PREFILLING, SessionState.DECODING):
            raise ValueError(f"adopt() moves a session to PREFILLING or DECODING, not {target.value}")
        expected = SessionState(expected_state).value if expected_state is not None else ""
        if extra_tokens < 0:
            raise ValueError(f"extra_tokens must be >= 0, got {extra_tokens}")
        args = (
            session_id,
            new_owner,
            lease_ms,
            target.value,
            expected,
            expected_owner or "",
            int(force),
            extra_tokens,
            expected_request or "",
            int(claim_ms),
            int(takeover),
            "" if cap_tokens is None else int(cap_tokens),
            set_request or "",
        )
        fields, blocks = await self._run("adopt", *args)
        return _record(session_id, _pairs(fields), blocks)

    async def unclaim(self, session_id: str, owner: str, request_id: str) -> int:
        """owner gives up waiting for request_id's session: its claim goes, and the session, if it was handed to owner
        for that request meanwhile, is freed. Returns the number of blocks freed."""
        return int(await self._run("unclaim", session_id, owner, request_id))

    async def handoffs(self, owner: str) -> AsyncIterator[str | SessionRecord]:
        """Hand-off announcements for a decode worker, for as long as the caller listens: the id of every session that
        becomes PREFILLED (a hint to try `adopt`), and the record of every session handed to `owner` by its claim.

        Pub/sub delivers at most once: a listener must still poll (`adopt` with the claim returns a session handed
        over while the announcement was lost).
        """
        prefilled = self.key("prefilled")
        async for channel, data in self._messages(prefilled, self.key("adopted", owner)):
            if channel == prefilled:
                yield data
            else:
                handed = json.loads(data)
                yield _record(handed["session"], _pairs(handed["fields"]), handed["blocks"])

    async def free(
        self,
        session_id: str,
        owner: str | None = None,
        *,
        expected_state: SessionState | str | None = None,
        expected_request: str | None = None,
    ) -> int:
        """Returns all the session's blocks to the free-list and deletes it; returns how many. Idempotent.

        With owner, a session owned by someone else raises NotOwner: a worker that lost its session to an adopter
        (its lease expired while it stalled) must not free blocks the adopter is using. Without, it frees whatever
        the owner (the gateway cancelling a request, an operator). With expected_state or expected_request, a
        session in another state or holding another request raises WrongState and is left alone: the gateway frees
        its request's hand-off that nobody adopted only while it is PREFILLED.
        """
        expected = SessionState(expected_state).value if expected_state is not None else ""
        return int(await self._run("free", session_id, owner or "", expected, expected_request or ""))

    async def release(self, session_id: str, owner: str) -> None:
        """The owner keeps the session for the next turn: IDLE, no owner, no lease, most recently used in the LRU."""
        await self._run("release", session_id, owner)

    async def renew_leases(self, owner: str, lease_ms: int, progress: Mapping[str, int] | None = None) -> int:
        """Heartbeat: extends every PREFILLING/DECODING session of owner by lease_ms; returns how many.

        progress: session id -> num_tokens whose K/V the owner has written, recorded for its DECODING sessions (a
        worker that takes one over recomputes only the tokens after it).
        """
        _check_positive("lease_ms", lease_ms)
        pairs = [x for sid, n in (progress or {}).items() for x in (sid, int(n))]
        return int(await self._run("renew_leases", owner, lease_ms, *pairs))

    async def owned_sessions(self, owner: str) -> set[str]:
        """The ids of the sessions owner holds now (a worker back from a stall finds out which it lost)."""
        return set(await self._retrying("owned", lambda: self._redis.smembers(self.key("owned", owner))))

    async def reclaim_expired(self, now_ms: int | None = None) -> list[str]:
        """Frees every session whose lease expired (by the Redis clock, or now_ms); returns their ids."""
        return list(await self._run("reclaim_expired", "" if now_ms is None else int(now_ms)))

    async def evict_lru(self, blocks_needed: int) -> list[str]:
        """Frees idle sessions, least recently used first, until blocks_needed blocks are free; returns their ids.

        Evicts nothing when enough are already free, or when even every idle session would not be enough.
        """
        return list(await self._run("evict_lru", int(blocks_needed)))

    async def expire_idle(self, max_idle_ms: int, limit: int = 1000, now_ms: int | None = None) -> list[str]:
        """Frees IDLE sessions last used more than max_idle_ms ago (by the Redis clock, or now_ms), at most limit of
        them; returns their ids. The session TTL: an idle session holds its K/V and its token ids (update(tokens=...))
        until a turn takes it back, eviction needs its blocks, or this."""
        _check_positive("max_idle_ms", max_idle_ms)
        _check_positive("limit", limit)
        return list(await self._run("expire_idle", int(max_idle_ms), int(limit), "" if now_ms is None else int(now_ms)))

    async def _messages(self, *channels: str) -> AsyncIterator[tuple[str, str]]:
        """(channel, data) of every message published on `channels` while the caller listens."""
        pubsub = self._redis.pubsub(ignore_subscribe_messages=True)
        try:
            await pubsub.subscribe(*channels)
            async for message in pubsub.listen():
                if message["type"] == "message":
                    yield message["channel"], message["data"]
        finally:
            await pubsub.aclose()

    async def get_tokens(self, session_id: str) -> list[int]:
        """The token ids recorded with update(tokens=...); [] when none were."""
        raw = await self._retrying("tokens", lambda: self._redis.hget(self.key("session", session_id), "tokens"))
        return [int(t) for t in raw.split(",")] if raw else []

    async def get(self, session_id: str) -> SessionRecord | None:
        async def read() -> list[Any]:
            async with self._redis.pipeline(transaction=True) as pipe:
                pipe.hgetall(self.key("session", session_id))
                pipe.lrange(self.key("session", session_id, "blocks"), 0, -1)
                return await pipe.execute()

        fields, blocks = await self._retrying("get", read)
        return _record(session_id, fields, blocks) if fields else None

    # -- workers --------------------------------------------------------------------------------------------------

    async def register_worker(
        self, worker_id: str, role: str, address: str, ttl_ms: int, info: Mapping[str, Any] | None = None
    ) -> None:
        """Announces a worker for ttl_ms (re-registering replaces the record); heartbeat() keeps it alive."""
        _check_id("worker id", worker_id)
        _check_positive("ttl_ms", ttl_ms)
        await self._run("register_worker", worker_id, role, address, ttl_ms, json.dumps(dict(info or {})))

    async def heartbeat(self, worker_id: str, ttl_ms: int, load: Mapping[str, Any] | None = None) -> bool:
        """Extends the registration and records the load. False: the worker had expired and must register again."""
        _check_positive("ttl_ms", ttl_ms)
        return bool(await self._run("heartbeat", worker_id, ttl_ms, json.dumps(dict(load or {}))))

    async def deregister_worker(self, worker_id: str) -> bool:
        """Removes the worker from the registry; returns whether it was registered. Its sessions are untouched."""
        return bool(await self._run("deregister_worker", worker_id))

    async def worker_registered(self, worker_id: str) -> bool:
        """Whether the worker's registry entry is alive (it heartbeated within its TTL): the liveness a takeover
        goes by (adopt with takeover)."""
        return bool(await self._retrying("worker", lambda: self._redis.exists(self.key("worker", worker_id))))

    async def worker_gone(self, worker_id: str) -> bool:
        """Whether the worker is gone for good: its registry entry is missing while the pool is whole. Right after
        Redis lost its state every entry is missing, but live workers are about to re-assert theirs (no pool yet, or
        recovering): not gone. Answers at once (no retries): the gateway asks on a stream's silence."""
        async with self._redis.pipeline(transaction=True) as pipe:
            pipe.exists(self.key("worker", worker_id))
            pipe.hmget(self.key("pool"), "epoch", "recovering_until_ms")
            registered, (epoch, recovering) = await pipe.execute()
        return not registered and bool(epoch) and not recovering

    async def list_workers(self, role: str | None = None) -> list[WorkerInfo]:
        """The live (unexpired) workers, of one role or all, ordered by registration expiry (soonest first)."""
        out = []
        for flat in await self._run("list_workers", role or ""):
            f = _pairs(flat)
            out.append(
                WorkerInfo(
                    worker_id=f["worker_id"],
                    role=f["role"],
                    address=f["address"],
                    info=json.loads(f.get("info") or "{}"),
                    load=json.loads(f.get("load") or "{}"),
                    registered_ms=int(f["registered_ms"]),
                    heartbeat_ms=int(f["heartbeat_ms"]),
                    expires_ms=int(f["expires_ms"]),
                )
            )
        return out

    # -- observability --------------------------------------------------------------------------------------------

    async def stats(self) -> PoolStats:
        num_blocks, block_size, free, sessions, idle = await self._run("stats")
        if num_blocks == "":
            raise PoolNotInitialized(f"no KV block pool under prefix {self.prefix!r}: call init_pool first")
        return PoolStats(
            num_blocks=int(num_blocks),
            block_size=int(block_size),
            free=int(free),
            used=int(num_blocks) - int(free),
            active_sessions=int(sessions) - int(idle),
            idle_sessions=int(idle),
        )

    async def audit(self, allow_active: bool = False) -> AuditReport:
        """Checks the pool's invariants on one atomic snapshot.

        Every block id 0..n-1 appears exactly once across the free-list and all block tables; no session is left
        PREFILLING/PREFILLED/DECODING (unless allow_active); no block table, lease, idle entry, index entry or owner
        set without its session; leases and the idle LRU agree with the session records; num_tokens fits the blocks.
        """
        escaped = _glob_escape(self.prefix)
        snapshot = await self._run("audit", f"{escaped}:session:*", f"{escaped}:owned:*")
        return _check_snapshot(self.prefix, snapshot, allow_active)


def _check_snapshot(prefix: str, snapshot: list[Any], allow_active: bool) -> AuditReport:
    pool_flat, free, session_index, leases_flat, idle_flat, session_keys, owned_keys, _now = snapshot
    pool = _pairs(pool_flat)
    if not pool:
        problems = (f"no pool under prefix {prefix!r}",)
        return AuditReport(ok=False, message=f"pool audit: {problems[0]}", problems=problems)
    num_blocks, block_size = int(pool["num_blocks"]), int(pool["block_size"])
    problems: list[str] = []

    session_prefix = f"{prefix}:session:"
    hashes: dict[str, dict[str, str]] = {}
    tables: dict[str, list[str]] = {}
    for key, kind, contents in session_keys:
        rest = key[len(session_prefix) :]
        if kind == "list" and rest.endswith(":blocks"):
            tables[rest[: -len(":blocks")]] = contents
        elif kind == "hash" and ":" not in rest:
            hashes[rest] = _pairs(contents)
        else:
            problems.append(f"unexpected key {key} ({kind})")

    # Where each block id is: it must be in exactly one place.
    places: dict[int, list[str]] = defaultdict(list)
    for label, ids in [("the free-list", free)] + [(f"session {sid}", ids) for sid, ids in sorted(tables.items())]:
        for raw in ids:
            try:
                block = int(raw)
            except ValueError:
                problems.append(f"{label} holds {raw!r}, not a block id")
                continue
            if not 0 <= block < num_blocks:
                problems.append(f"{label} holds block {block}, outside 0..{num_blocks - 1}")
            places[block].append(label)
    leaked = [b for b in range(num_blocks) if b not in places]
    if leaked:
        problems.append(f"{len(leaked)} block(s) leaked (in no free-list and no session): {_ids(leaked)}")
    for block, where in sorted(places.items()):
        if len(where) > 1:
            counts = Counter(where)
            listed = ", ".join(f"{w} x{c}" if c > 1 else w for w, c in counts.items())
            problems.append(f"block {block} is held {len(where)} times: {listed}")

    leases = {sid: float(score) for sid, score in _pairs(leases_flat).items()}
    idle = set(idle_flat[::2])
    index = set(session_index)
    owned = {key[len(f"{prefix}:owned:") :]: set(members) for key, _kind, members in owned_keys}
    for sid, fields in sorted(hashes.items()):
        state, owner = fields.get("state", ""), fields.get("owner", "")
        lease = fields.get("lease_expires_ms", "")
        if sid not in index:
            problems.append(f"session {sid} is missing from the {prefix}:sessions index")
        if state not in SessionState.__members__:
            problems.append(f"session {sid} has unknown state {state!r}")
        elif SessionState(state) in ACTIVE_STATES and not allow_active:
            problems.append(
                f"session {sid} is still {state} (owner {owner or 'none'}): not finished, freed or released"
            )
        if state == "IDLE":
            if owner or lease or sid in leases:
                problems.append(f"idle session {sid} has an owner or lease")
            if sid not in idle:
                problems.append(f"idle session {sid} is missing from the {prefix}:idle LRU")
        else:
            if sid in idle:
                problems.append(f"session {sid} is {state} but in the idle LRU")
            if not owner or not lease:
                problems.append(f"session {sid} is {state} without an owner and a lease")
            elif leases.get(sid) != float(lease):
                problems.append(f"session {sid}'s lease ({lease}) disagrees with {prefix}:leases ({leases.get(sid)})")
            if owner and sid not in owned.get(owner, set()):
                problems.append(f"session {sid} is missing from {prefix}:owned:{owner}")
        capacity = len(tables.get(sid, [])) * block_size
        if int(fields.get("num_tokens") or 0) > capacity:
            problems.append(f"session {sid} claims {fields['num_tokens']} tokens but its blocks hold {capacity}")
    for sid in sorted(set(tables) - set(hashes)):
        problems.append(f"dangling block table {prefix}:session:{sid}:blocks (no session record)")
    for label, sids in (("sessions index", index), ("leases", set(leases)), ("idle LRU", idle)):
        for sid in sorted(sids - set(hashes)):
            problems.append(f"{prefix}:{label.split()[0]} entry {sid!r} has no session record")
    for owner, sids in sorted(owned.items()):
        for sid in sorted(sids):
            if hashes.get(sid, {}).get("owner") != owner:
                problems.append(f"{prefix}:owned:{owner} lists {sid!r}, which {owner} does not own")

    if problems:
        shown = "; ".join(problems[:20]) + (f"; ... {len(problems) - 20} more" if len(problems) > 20 else "")
        return AuditReport(
            ok=False, message=f"pool audit found {len(problems)} problem(s): {shown}", problems=tuple(problems)
        )
    used = num_blocks - len(free)
    message = f"pool ok: {num_blocks} blocks, {len(free)} free, {used} in {len(hashes)} session(s)"
    return AuditReport(ok=True, message=message, problems=())


def _ids(ids: list[int], limit: int = 12) -> str:
    shown = ", ".join(map(str, ids[:limit]))
    return shown + (f", ... ({len(ids) - limit} more)" if len(ids) > limit else "")

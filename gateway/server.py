"""The public gRPC gateway: validation, tokenizing and chat templates, routing to the least-loaded prefill and decode
workers, incremental detokenizing, stop strings, deadlines, and cancellation that reaches the worker holding a session.

Failover: a worker that dies or stops answering costs the client a pause, never an error. A Prefill call that fails
as if its worker were gone is retried on another prefill worker; a Decode stream that does is resumed on another
decode worker with every token the client has, and the stream goes on from there (services/decode/server.py).

Redis faults: the gateway pings Redis every STORE_POLL_S; while it does not answer, health says NOT_SERVING and new
requests get UNAVAILABLE ("session store unreachable at redis://:***@host:port ...") at once. A worker that says the
same is not taken for a dead one (another would fail alike): its status goes to the client as it is. Streams in
flight wait: a silent worker is not declared gone while Redis is away or recovering from lost state.

    python -m gateway.server --kvstore 127.0.0.1:50070 --port 50051
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import sys
import time
import uuid

import grpc
from redis.exceptions import RedisError

from gateway.detokenizer import IncrementalDetokenizer
from gateway.router import NoWorkers, Router
from gateway.stop_strings import StopMatcher
from gateway.validation import InvalidRequest, Validator, ValidRequest
from kvrelay import trace
from kvrelay.internal.v1 import decode_pb2, decode_pb2_grpc, prefill_pb2, prefill_pb2_grpc
from kvrelay.model_config import ModelConfig
from kvrelay.rpc.auth import ApiKeyGate, ApiKeys, SecurityConfigError, server_tls_credentials
from kvrelay.rpc.grpc_server import install_uvloop
from kvrelay.rpc.health import wait_healthy
from kvrelay.rpc.layout import fetch_layout
from kvrelay.rpc.lifecycle import Health, serve
from kvrelay.sampling import params_to_proto
from kvrelay.settings import GatewaySettings, parse
from kvrelay.tokenizer import Tokenizer
from kvrelay.v1 import common_pb2, gateway_pb2, gateway_pb2_grpc
from kvstore.sessions import STORE_UNREACHABLE, SessionState, SessionStore, WrongState

log = logging.getLogger("kvrelay.gateway")
SERVICE = "kvrelay.v1.Gateway"
MAX_REQUEST_BYTES = 4 * 2**20  # larger GenerateRequests are refused by gRPC itself (RESOURCE_EXHAUSTED)
UNSET = common_pb2.FINISH_REASON_UNSPECIFIED

# A call that fails with UNAVAILABLE could not reach its worker, or lost it (connection refused or reset, "Stream
# removed" after a kill -9), or the worker is draining or still loading: in every case another worker may serve it.
RETRY_CODES = frozenset({grpc.StatusCode.UNAVAILABLE})
# A worker that stops answering without its connection failing (a frozen process, a hung host) is found by silence:
# when a call has brought nothing for SILENCE_S, the gateway looks its worker up in the registry, and moves the
# session only once the worker is gone from it. Silence alone proves nothing: a decode step under contention, a
# sequence waiting for blocks or a long prefill are silent too, and taking a session from a live worker is unsafe (it
# would go on writing into the same blocks). The registry entry expires WORKER_TTL_MS (5 s) after the last
# heartbeat, and a worker stops writing before that (services/common/worker.py, ACT_S), so the look-up is the
# decision and SILENCE_S only how soon it is made: 1 s costs one Redis EXISTS per silent call per second and finds a
# frozen worker at most a second after its entry expired.
SILENCE_S = 1.0
PREFILL_ATTEMPTS = 3  # prefill workers tried per request
DECODE_RESUMES = 4  # times a request's decode may move to another worker
FAILOVER_WAIT_S = 30.0  # how long a failover waits for a worker to route to (e.g. one that is restarting)
STORE_POLL_S = 0.5  # how often the gateway pings Redis (health, and refusing new requests while it is away)
PING_TIMEOUT_S = 1.5  # a ping that takes longer counts as Redis away (a stopped Redis never answers)


def store_failure(exc: grpc.aio.AioRpcError) -> bool:
    """Whether a worker's UNAVAILABLE is about the session store (Redis away), not about the worker itself."""
    return exc.code() == grpc.StatusCode.UNAVAILABLE and STORE_UNREACHABLE in (exc.details() or "")


class _Gone(Exception):
    """The worker a call waits on has been silent for SILENCE_S and is gone from the registry."""


def _consume(future: asyncio.Future) -> None:
    if not future.cancelled():
        future.exception()


def downstream_code(exc: grpc.aio.AioRpcError) -> grpc.StatusCode:
    """The status a worker's failure reaches the client with: the worker's own, except UNKNOWN (a worker that let an
    exception out; kvrelay's guard answers INTERNAL for those, but a worker of another version may not)."""
    return grpc.StatusCode.INTERNAL if exc.code() == grpc.StatusCode.UNKNOWN else exc.code()


class GatewayServicer(gateway_pb2_grpc.GatewayServicer):
    """Registered with the server at once (so health and reflection answer); configure() makes it serve."""

    ready = False
    api_keys = ApiKeys()  # none: open, and session ids as clients send them
    store_down = ""  # why Redis is away ("session store unreachable at ..."), "" while it answers

    def configure(
        self,
        tokenizer: Tokenizer | None,
        config: ModelConfig,
        model_name: str,
        layout,
        store: SessionStore,
        max_model_len: int,
        max_prompt_bytes: int = GatewaySettings.max_prompt_bytes,
        tokenize_threads: int = GatewaySettings.tokenize_threads,
    ) -> None:
        self.tokenizer = tokenizer
        self.config = config
        self.model_name = model_name
        self.layout = layout
        self.store = store
        self.router = Router(store)
        self.max_model_len = max_model_len
        # Tokenizing (and chat templates) in a bounded thread pool: a huge prompt must not stall the other streams.
        self.validate = Validator(
            tokenizer, model_name, max_model_len, config.vocab_size, max_prompt_bytes, tokenize_threads
        )
        # End-of-generation ids the tokenizer knows beyond config.json's (e.g. <|endoftext|>), sent as stop ids so
        # the workers stop where `kvrelay run` stops.
        known = tokenizer.eos_token_ids if tokenizer is not None else ()
        self.extra_eos = tuple(sorted(set(known) - set(config.eos_token_ids)))
        self.ready = True

    async def _check_ready(self, context) -> None:
        if not self.ready:
            await context.abort(grpc.StatusCode.UNAVAILABLE, "the gateway is starting: the model is not ready yet")

    async def Generate(self, request, context):  # noqa: N802
        # context.write, not yield: a client that goes away cancels this coroutine wherever it waits, and the stream
        # is closed (its cleanup frees the blocks) right here. A handler written as an async generator that is
        # suspended in a send when the client goes is closed only whenever it is garbage collected.
        async with contextlib.aclosing(self._generate(request, context)) as stream:
            async for message in stream:
                await context.write(message)

    async def Complete(self, request, context):  # noqa: N802
        out = gateway_pb2.CompleteResponse()
        async with contextlib.aclosing(self._generate(request, context)) as stream:
            async for message in stream:
                out.token_ids.extend(message.token_ids)
                out.text += message.text
                out.logprobs.extend(message.logprobs)
                if message.HasField("finish"):
                    out.finish.CopyFrom(message.finish)
        return out

    async def GetModelInfo(self, request, context):  # noqa: N802
        await self._check_ready(context)
        c = self.config
        return gateway_pb2.ModelInfo(
            name=self.model_name,
            architecture=c.architecture,
            dtype=self.layout.dtype,
            kv_dtype=self.layout.kv_dtype,
            block_size=self.layout.pool.block_size,
            max_model_len=self.max_model_len,
            vocab_size=c.vocab_size,
            num_layers=c.num_layers,
            eos_token_ids=list(self.tokenizer.eos_token_ids if self.tokenizer else self.config.eos_token_ids),
        )

    async def GetStatus(self, request, context):  # noqa: N802
        await self._check_ready(context)
        stats = await self.store.stats()
        now_ms = time.time() * 1e3
        workers = [
            gateway_pb2.WorkerStatus(
                worker_id=w.worker_id,
                role=w.role,
                address=w.address,
                active_sessions=int(w.load.get("active", 0)),
                queued=int(w.load.get("queued", 0)),
                last_heartbeat_ms_ago=max(0.0, now_ms - w.heartbeat_ms),
            )
            for w in await self.store.list_workers()
        ]
        return gateway_pb2.StatusResponse(
            workers=workers,
            num_blocks=stats.num_blocks,
            blocks_free=stats.free,
            blocks_used=stats.used,
            active_sessions=stats.active_sessions,
        )

    async def watch_store(self, health) -> None:
        """Ping Redis every STORE_POLL_S: health and admission follow whether it answers."""
        while True:
            try:
                await asyncio.wait_for(self.store.ping(), PING_TIMEOUT_S)
                if self.store_down:
                    log.warning("the session store answers again; serving")
                self.store_down = ""
            except Exception as exc:  # down, stopped, or refusing: all the same to a request
                if not self.store_down:
                    log.warning("the session store is unreachable (%s: %s); NOT_SERVING", type(exc).__name__, exc)
                why = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
                self.store_down = f"{STORE_UNREACHABLE} at {self.store.url} ({why})"
            await health.dependency(not self.store_down, self.store_down)
            await asyncio.sleep(STORE_POLL_S)

    async def _generate(self, request, context):
        start = time.perf_counter()
        await self._check_ready(context)
        if self.store_down:
            await context.abort(grpc.StatusCode.UNAVAILABLE, f"{self.store_down}; retry")
        try:
            valid = await self.validate(request)
        except InvalidRequest as exc:
            await context.abort(exc.code, exc.message)
        params = valid.params
        if not params.ignore_eos and self.extra_eos:
            params = params.__class__(**{**params.__dict__, "stop_token_ids": params.stop_token_ids + self.extra_eos})
        session_id = await self.api_keys.scoped_session_id(context, request.session_id or uuid.uuid4().hex)
        request_id = request.request_id or uuid.uuid4().hex
        run = _Stream(self, valid, params, session_id, request_id, start, keep_session=bool(request.session_id))
        try:
            async for message in run.messages(context):
                yield message
        finally:
            await run.cleanup()


class _Stream:
    """One request's trip through prefill and decode, and what must be undone if it ends early."""

    def __init__(
        self,
        gw: GatewayServicer,
        valid: ValidRequest,
        params,
        session_id: str,
        request_id: str,
        start: float,
        keep_session: bool,
    ) -> None:
        self.gw, self.valid, self.params = gw, valid, params
        self.session_id, self.request_id, self.start = session_id, request_id, start
        # A checkpoint without a tokenizer (random-weight benchmarks) streams token ids only.
        self.detok = (
            IncrementalDetokenizer(gw.tokenizer, valid.prompt_token_ids, skip_special_tokens=True)
            if gw.tokenizer is not None
            else None
        )
        self.stops = StopMatcher(valid.stop)
        self.decode_call = None
        self.decode_worker = None  # the decode worker this request counts against in the router, while it does
        self.tokens: list[int] = []  # every token the client has been sent (what a resumed decode continues from)
        # A decode call the session was moved away from because it went silent, kept open (never cancelled) until
        # the new call's first message proves the takeover: cancelling it earlier would make a frozen worker that
        # wakes up free the session before the new one adopts it.
        self.left_call = None
        self.left_worker = None  # left_call's worker
        self.reading: dict[object, asyncio.Future] = {}  # call -> its read() in progress, kept across silences
        self.handed_off = False  # decode's first message arrived: the session is the decode worker's
        self.ended_at_prefill = False  # prefill's reply finished the request: prefill freed or released the session
        self.finished = False
        self.cached_tokens = 0
        # A client that names its session continues a conversation: its KV stays in the pool between turns.
        self.keep_session = keep_session
        self.timings = common_pb2.Timings()

    async def _pick(self, role: str, context, wait: bool = False):
        """The least-loaded worker of `role`; wait: after a failure, give one FAILOVER_WAIT_S to come (restarting)."""
        deadline = time.monotonic() + (FAILOVER_WAIT_S if wait else 0.0)
        while True:
            try:
                return await self.gw.router.pick(role)
            except NoWorkers as exc:
                if time.monotonic() >= deadline:
                    await context.abort(grpc.StatusCode.UNAVAILABLE, str(exc))
            await asyncio.sleep(0.5)

    async def _prefill(self, context) -> prefill_pb2.PrefillResponse:
        """Prefill on the least-loaded worker; should that worker die or vanish before it answers, on another.

        The dead worker leaves the session PREFILLING under its name, which only its lease expiry (LEASE_MS) would
        free. An anonymous request starts over under a new session id (its waiting Decode call is cancelled, and the
        old session is reclaimed with the dead worker's lease). A named session keeps its id: the next prefill
        worker takes it over once Redis says the dead one is gone (services/prefill/server.py); if the dead worker
        had finished (the session is PREFILLED or DECODING for this request) only its reply was lost, and the first
        token comes from the record.
        """
        router = self.gw.router
        for attempt in range(1, PREFILL_ATTEMPTS + 1):
            # A request of one token ends at prefill: it needs no decode worker.
            retry = attempt > 1
            if self.decode_call is None and self.params.max_tokens > 1:
                self._start_decode(await self._pick("decode", context, wait=retry), context)
            worker = await self._pick("prefill", context, wait=retry)
            stub = prefill_pb2_grpc.PrefillStub(router.channel(worker.address))
            req = prefill_pb2.PrefillRequest(
                session_id=self.session_id,
                request_id=self.request_id,
                token_ids=self.valid.prompt_token_ids,
                sampling=params_to_proto(self.params),
                keep_session=self.keep_session,
            )
            router.acquire(worker)
            call = stub.Prefill(req, timeout=context.time_remaining())
            try:
                return await self._reply(call, worker)
            except (grpc.aio.AioRpcError, _Gone) as exc:
                failed = isinstance(exc, _Gone) or (exc.code() in RETRY_CODES and not store_failure(exc))
                if not failed or attempt == PREFILL_ATTEMPTS:
                    code = grpc.StatusCode.UNAVAILABLE if isinstance(exc, _Gone) else downstream_code(exc)
                    details = "the prefill worker vanished" if isinstance(exc, _Gone) else exc.details()
                    await context.abort(code, f"prefill: {details}")
                call.cancel()
                router.unreachable(worker)
                why = "silent and gone from the registry" if isinstance(exc, _Gone) else exc.code().name
                log.warning("request %s: prefill on %s failed (%s); retrying", self.request_id, worker.worker_id, why)
                reply = await self._after_lost_prefill()
                if reply is not None:
                    return reply
            finally:
                router.release(worker)

    async def _reply(self, call, worker):
        """A unary call's reply; _Gone if its worker is silent and gone from the registry meanwhile."""
        waiter = asyncio.ensure_future(call)
        waiter.add_done_callback(_consume)  # it may fail (its deadline) after the request stopped waiting for it
        try:
            while True:
                done, _ = await asyncio.wait({waiter}, timeout=SILENCE_S)
                if done:
                    return waiter.result()
                if await self._gone(worker):
                    raise _Gone(worker.worker_id)
        finally:
            if not waiter.done():
                waiter.cancel()  # the request ended (or the worker is gone): so does the call

    async def _after_lost_prefill(self) -> prefill_pb2.PrefillResponse | None:
        """Get ready to prefill again after the worker died; a reply when it turns out it had finished."""
        if not self.keep_session:
            self._drop_decode()  # it waits for the old session id; its decode worker unclaims (or frees) it
            with contextlib.suppress(WrongState):  # finished before dying, and not handed over: free it now
                await self.gw.store.free(
                    self.session_id, expected_state=SessionState.PREFILLED, expected_request=self.request_id
                )
            self.session_id = uuid.uuid4().hex
            return None
        record = await self.gw.store.get(self.session_id)
        done = (SessionState.PREFILLED, SessionState.DECODING)
        if record is not None and record.request_id == self.request_id and record.state in done:
            # only the reply was lost (without its logprob and timings): the Decode call has, or gets, the session
            return prefill_pb2.PrefillResponse(first_token_id=record.first_token, num_tokens=record.num_tokens)
        return None

    def _drop_decode(self) -> None:
        if self.decode_worker is not None:
            self.gw.router.release(self.decode_worker)
            self.decode_worker = None
        for call in (self.decode_call, self.left_call):
            if call is not None and not call.done():
                call.cancel()
        self.decode_call = self.left_call = None

    def _start_decode(self, worker, context, resume: bool = False) -> None:
        """Open the Decode call right behind the Prefill call (await_prefill): the decode worker waits for the
        hand-off and adopts the session the moment prefill offers it in Redis, so the hand-off costs no round trip
        through this gateway; decode's first step runs while prefill's reply is still on its way here.

        resume: the session's decode worker died or vanished; the call sends every token the client has, and the
        new worker takes the session over and continues after them."""
        router = self.gw.router
        stub = decode_pb2_grpc.DecodeStub(router.channel(worker.address))
        self.decode_call = stub.Decode(
            decode_pb2.DecodeRequest(
                session_id=self.session_id,
                request_id=self.request_id,
                sampling=params_to_proto(self.params),
                token_ids=[*self.valid.prompt_token_ids, *self.tokens] if resume else self.valid.prompt_token_ids,
                num_generated=len(self.tokens) if resume else 0,
                keep_session=self.keep_session,
                await_prefill=not resume,
            ),
            timeout=context.time_remaining(),
        )
        router.acquire(worker)
        self.decode_worker = worker

    def _chunk(self, token_ids: list[int], logprobs) -> gateway_pb2.GenerateResponse:
        text = self.stops.feed(self.detok.add(token_ids)) if self.detok else ""
        return gateway_pb2.GenerateResponse(token_ids=token_ids, text=text, logprobs=logprobs)

    def _finish(self, message, reason: int, completion_tokens: int) -> gateway_pb2.GenerateResponse:
        tail = self.stops.feed(self.detok.flush()) if self.detok and self.stops.matched is None else ""
        message.text += tail + self.stops.flush()
        if self.stops.matched is not None:
            reason = common_pb2.FINISH_REASON_STOP_STRING
        self.timings.total_ms = (time.perf_counter() - self.start) * 1e3
        message.finish.CopyFrom(
            gateway_pb2.Finish(
                reason=reason,
                stop_string=self.stops.matched or "",
                prompt_tokens=len(self.valid.prompt_token_ids),
                completion_tokens=completion_tokens,
                cached_prompt_tokens=self.cached_tokens,
                timings=self.timings,
                request_id=self.request_id,
                session_id=self.gw.api_keys.client_session_id(self.session_id),
            )
        )
        self.finished = True
        return message

    async def messages(self, context):
        reply = await self._prefill(context)
        t_prefilled = time.perf_counter()
        trace.mark(self.session_id, "gw_start", self.start)
        trace.mark(self.session_id, "gw_prefill_reply", t_prefilled)
        self.timings.queue_ms, self.timings.prefill_ms = reply.queue_ms, reply.prefill_ms
        self.cached_tokens = reply.cached_tokens
        self.timings.ttft_ms = (t_prefilled - self.start) * 1e3
        tokens = self.tokens
        tokens.append(reply.first_token_id)
        first = self._chunk(tokens[:], [reply.logprob] if reply.HasField("logprob") else [])
        if reply.finish != UNSET or self.stops.matched is not None:
            self.ended_at_prefill = reply.finish != UNSET  # prefill freed the session, or kept it for the next turn
            yield self._finish(first, reply.finish, 1)
            return
        t_decode = None
        try:
            yield first
            async for d in self._decode_messages(context):
                if t_decode is None:
                    t_decode = time.perf_counter()
                    trace.mark(self.session_id, "gw_decode_first", t_decode)
                    self.handed_off = True
                    self.timings.handoff_ms = (t_decode - t_prefilled) * 1e3
                    self.timings.handoff_decode_ms = d.first_step_ms
                tokens.extend(d.token_ids)
                message = self._chunk(list(d.token_ids), list(d.logprobs))
                if d.finish != UNSET or self.stops.matched is not None:
                    self.timings.decode_ms = (time.perf_counter() - t_decode) * 1e3
                    yield self._finish(message, d.finish, len(tokens))
                    return
                yield message
        except grpc.aio.AioRpcError as exc:
            if exc.code() != grpc.StatusCode.CANCELLED:
                await context.abort(downstream_code(exc), f"decode: {exc.details()}")
            raise

    async def _decode_messages(self, context):
        """The Decode stream's messages, across decode workers. When the worker streaming the session dies (the
        call fails with UNAVAILABLE or ends without a finish) or goes silent and vanishes from the registry, the
        session moves to another decode worker, which continues after the tokens the client has: the client sees a
        pause. A resume refused because the silent worker turned out alive sends the stream back to that worker."""
        resumes = 0
        answered = False  # the current call has sent a message (so it holds the session)
        while True:
            call, worker = self.decode_call, self.decode_worker
            try:
                d = await self._read(call, worker)
            except _Gone:
                self.gw.router.unreachable(worker)
                if self.left_call is not None:  # a resume that went silent too: forget the older call
                    self.left_call.cancel()
                self.left_call, self.left_worker, d = call, worker, None  # open until the new call's first message
            except grpc.aio.AioRpcError as exc:
                refused = exc.code() == grpc.StatusCode.FAILED_PRECONDITION
                if refused and not answered and self.left_call is not None and not self.left_call.done():
                    # The takeover was refused: the worker we left is alive after all (it heartbeats again). Back to
                    # its stream, whose messages wait unread.
                    log.warning("request %s: %s kept the session; back to it", self.request_id, worker.worker_id)
                    self._switch(self.left_call, self.left_worker)
                    self.left_call, answered = None, True
                    continue
                if exc.code() == grpc.StatusCode.NOT_FOUND and resumes > 0:
                    # the resumed session is not in Redis: Redis lost its state and nobody re-asserted it, or its
                    # lease ran out while its worker was away. Its K/V cannot be trusted: the client retries.
                    await context.abort(
                        grpc.StatusCode.UNAVAILABLE,
                        "decode: the session's state is gone from the session store (Redis lost it, or its lease "
                        "ran out while its decode worker was away); retry",
                    )
                if exc.code() not in RETRY_CODES or store_failure(exc):
                    raise
                self.gw.router.unreachable(worker)
                d = None
            if d is grpc.aio.EOF:
                d = None  # a stream ends with a finish; without one, its worker went away
            if d is not None:
                if not answered and self.left_call is not None:
                    self.left_call.cancel()  # the new worker holds the session: the one we left lost it
                    self.left_call = None
                answered = True
                yield d
                if d.finish != UNSET:
                    return
                continue
            resumes += 1
            if resumes > DECODE_RESUMES:
                await context.abort(grpc.StatusCode.UNAVAILABLE, "decode: the session lost its decode worker again")
            await self._resume_decode(context, worker)
            answered = False

    async def _read(self, call, worker):
        """The call's next message (EOF at its end), never cancelling it; _Gone when it has been silent for SILENCE_S
        and its worker is gone from the registry (its read stays pending for a later return to the call)."""
        reader = self.reading.pop(call, None)
        if reader is None:
            reader = asyncio.ensure_future(call.read())
            reader.add_done_callback(_consume)  # a read left pending on an abandoned call may fail unread
        while True:
            done, _ = await asyncio.wait({reader}, timeout=SILENCE_S)
            if done:
                return reader.result()
            if await self._gone(worker):
                self.reading[call] = reader
                raise _Gone(worker.worker_id)

    async def _gone(self, worker) -> bool:
        """Whether a silent worker is gone for good. Not while Redis is away or has just lost its state (every
        registry entry is missing then, and live workers re-assert theirs): nothing proves it gone, and the worker
        itself ends what it cannot finish (services/common/worker.py STORE_WAIT_S)."""
        try:
            return await asyncio.wait_for(self.gw.store.worker_gone(worker.worker_id), SILENCE_S)
        except (RedisError, TimeoutError):
            return False

    def _switch(self, call, worker) -> None:
        router = self.gw.router
        if self.decode_worker is not None:
            router.release(self.decode_worker)
        router.acquire(worker)
        self.decode_call, self.decode_worker = call, worker

    async def _resume_decode(self, context, failed) -> None:
        """Move the session to another decode worker (waiting FAILOVER_WAIT_S at most for one to route to)."""
        if self.decode_worker is not None:
            self.gw.router.release(self.decode_worker)
            self.decode_worker = None
        worker = await self._pick("decode", context, wait=True)
        log.warning(
            "request %s: decode worker %s failed after %d tokens; resuming session %s on %s",
            self.request_id,
            failed.worker_id,
            len(self.tokens),
            self.session_id,
            worker.worker_id,
        )
        self._start_decode(worker, context, resume=True)

    async def cleanup(self) -> None:
        """Whatever ended the request (done, stop string, client gone, deadline), its blocks must come back."""
        if self.decode_worker is not None:
            self.gw.router.release(self.decode_worker)
            self.decode_worker = None
        for call in (self.decode_call, self.left_call):
            if call is not None and not call.done():
                call.cancel()  # a decode worker that adopted the session frees it (or keeps it IDLE)
        for reader in self.reading.values():
            reader.cancel()
        if self.decode_call is not None and not self.handed_off and not self.ended_at_prefill:
            # The request ended between prefill and decode: a hand-off nobody adopted is ours to free. Only while it
            # is this request's and still PREFILLED; once a decode worker adopted it, it is that worker's to free,
            # and one still PREFILLING is its prefill worker's (which frees the cancelled request's blocks).
            try:
                await self.gw.store.free(
                    self.session_id, expected_state=SessionState.PREFILLED, expected_request=self.request_id
                )
            except WrongState:
                pass
            except RedisError as exc:  # Redis away: the hand-off's lease runs out and a worker reclaims it
                log.warning("request %s: could not free its hand-off (%s)", self.request_id, exc)


async def run(settings: GatewaySettings) -> None:
    servicer = GatewayServicer()
    servicer.api_keys = ApiKeys.load(settings.api_keys_file)
    tls = server_tls_credentials(settings.tls_cert, settings.tls_key, settings.tls_client_ca)
    log.info("gateway: %s", servicer.api_keys.describe())
    if tls is None:
        log.info("gateway: no TLS (--tls-cert, --tls-key): requests, answers and API keys cross the network as is")
    stores: list[SessionStore] = []
    health = Health()
    tasks: list[asyncio.Task] = []

    async def startup(stop: asyncio.Event) -> None:
        await wait_healthy(settings.kvstore, "kvrelay.internal.v1.KVStore", timeout_s=600)
        layout = await fetch_layout(settings.kvstore)
        config = ModelConfig.from_dir(layout.model_dir)
        has_tokenizer = os.path.exists(os.path.join(layout.model_dir, "tokenizer.json"))
        tokenizer = await asyncio.to_thread(Tokenizer.from_dir, layout.model_dir) if has_tokenizer else None
        store = await SessionStore.connect(settings.redis_url, settings.name)
        stores.append(store)
        limit = min(settings.max_model_len or config.max_position_embeddings, config.max_position_embeddings)
        name = settings.model_name or os.path.basename(layout.model_dir.rstrip("/"))
        servicer.configure(
            tokenizer, config, name, layout, store, limit, settings.max_prompt_bytes, settings.tokenize_threads
        )
        tasks.append(asyncio.create_task(servicer.watch_store(health)))
        while True:  # serving means a request can complete: one prefill and one decode worker are up
            roles = {w.role for w in await store.list_workers()}
            if {"prefill", "decode"} <= roles:
                break
            await asyncio.sleep(0.2)
        log.info("gateway serving %s on %s:%d", name, settings.host, settings.port)

    async def shutdown() -> None:
        for task in tasks:
            task.cancel()
        if servicer.ready:
            servicer.validate.close()
        for store in stores:
            await store.close()

    servicers = [(gateway_pb2_grpc.add_GatewayServicer_to_server, servicer)]
    await serve(
        servicers,
        [SERVICE],
        settings.host,
        settings.port,
        startup,
        shutdown,
        max_receive_bytes=MAX_REQUEST_BYTES,
        interceptors=[ApiKeyGate(servicer.api_keys)] if len(servicer.api_keys) else [],  # public: no deployment secret
        tls=tls,
        unix_socket=settings.local_socket,
        health=health,
    )


def main() -> None:
    settings = parse(GatewaySettings, description="kvrelay gateway: the public gRPC API")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    install_uvloop()
    try:
        asyncio.run(run(settings))
    except SecurityConfigError as exc:
        sys.exit(f"gateway: {exc}")


if __name__ == "__main__":
    main()

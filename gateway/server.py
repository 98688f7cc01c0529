"""The public gRPC gateway: validation, tokenizing and chat templates, routing to the least-loaded prefill and decode
workers, incremental detokenizing, stop strings, deadlines, and cancellation that reaches the worker holding a session.

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
from kvrelay.rpc.lifecycle import serve
from kvrelay.sampling import params_to_proto
from kvrelay.settings import GatewaySettings, parse
from kvrelay.tokenizer import Tokenizer
from kvrelay.v1 import common_pb2, gateway_pb2, gateway_pb2_grpc
from kvstore.sessions import SessionState, SessionStore, WrongState

log = logging.getLogger("kvrelay.gateway")
SERVICE = "kvrelay.v1.Gateway"
MAX_REQUEST_BYTES = 4 * 2**20  # larger GenerateRequests are refused by gRPC itself (RESOURCE_EXHAUSTED)
UNSET = common_pb2.FINISH_REASON_UNSPECIFIED


def downstream_code(exc: grpc.aio.AioRpcError) -> grpc.StatusCode:
    """The status a worker's failure reaches the client with: the worker's own, except UNKNOWN (a worker that let an
    exception out; kvrelay's guard answers INTERNAL for those, but a worker of another version may not)."""
    return grpc.StatusCode.INTERNAL if exc.code() == grpc.StatusCode.UNKNOWN else exc.code()


class GatewayServicer(gateway_pb2_grpc.GatewayServicer):
    """Registered with the server at once (so health and reflection answer); configure() makes it serve."""

    ready = False
    api_keys = ApiKeys()  # none: open, and session ids as clients send them

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

    async def _generate(self, request, context):
        start = time.perf_counter()
        await self._check_ready(context)
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
        self.handed_off = False  # decode's first message arrived: the session is the decode worker's
        self.ended_at_prefill = False  # prefill's reply finished the request: prefill freed or released the session
        self.finished = False
        self.cached_tokens = 0
        # A client that names its session continues a conversation: its KV stays in the pool between turns.
        self.keep_session = keep_session
        self.timings = common_pb2.Timings()

    async def _pick(self, role: str, context):
        try:
            return await self.gw.router.pick(role)
        except NoWorkers as exc:
            await context.abort(grpc.StatusCode.UNAVAILABLE, str(exc))

    async def _prefill(self, context) -> prefill_pb2.PrefillResponse:
        router = self.gw.router
        # A request of one token ends at prefill: it needs no decode worker.
        decode_worker = await self._pick("decode", context) if self.params.max_tokens > 1 else None
        worker = await self._pick("prefill", context)
        stub = prefill_pb2_grpc.PrefillStub(router.channel(worker.address))
        req = prefill_pb2.PrefillRequest(
            session_id=self.session_id,
            request_id=self.request_id,
            token_ids=self.valid.prompt_token_ids,
            sampling=params_to_proto(self.params),
            keep_session=self.keep_session,
        )
        router.acquire(worker)
        try:
            call = stub.Prefill(req, timeout=context.time_remaining())
            if decode_worker is not None:
                self._start_decode(decode_worker, context)
            return await call
        except grpc.aio.AioRpcError as exc:
            await context.abort(downstream_code(exc), f"prefill: {exc.details()}")
        finally:
            router.release(worker)

    def _start_decode(self, worker, context) -> None:
        """Open the Decode call right behind the Prefill call (await_prefill): the decode worker waits for the
        hand-off and adopts the session the moment prefill offers it in Redis, so the hand-off costs no round trip
        through this gateway; decode's first step runs while prefill's reply is still on its way here."""
        router = self.gw.router
        stub = decode_pb2_grpc.DecodeStub(router.channel(worker.address))
        self.decode_call = stub.Decode(
            decode_pb2.DecodeRequest(
                session_id=self.session_id,
                request_id=self.request_id,
                sampling=params_to_proto(self.params),
                token_ids=self.valid.prompt_token_ids,
                num_generated=0,
                keep_session=self.keep_session,
                await_prefill=True,
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
        tokens = [reply.first_token_id]
        first = self._chunk(tokens[:], [reply.logprob] if reply.HasField("logprob") else [])
        if reply.finish != UNSET or self.stops.matched is not None:
            self.ended_at_prefill = reply.finish != UNSET  # prefill freed the session, or kept it for the next turn
            yield self._finish(first, reply.finish, 1)
            return
        t_decode = None
        try:
            yield first
            async for d in self.decode_call:
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

    async def cleanup(self) -> None:
        """Whatever ended the request (done, stop string, client gone, deadline), its blocks must come back."""
        if self.decode_worker is not None:
            self.gw.router.release(self.decode_worker)
            self.decode_worker = None
        if self.decode_call is not None and not self.decode_call.done():
            self.decode_call.cancel()  # a decode worker that adopted the session frees it (or keeps it IDLE)
        if self.decode_call is not None and not self.handed_off and not self.ended_at_prefill:
            # The request ended between prefill and decode: a hand-off nobody adopted is ours to free. Only while it
            # is this request's and still PREFILLED; once a decode worker adopted it, it is that worker's to free,
            # and one still PREFILLING is its prefill worker's (which frees the cancelled request's blocks).
            with contextlib.suppress(WrongState):
                await self.gw.store.free(
                    self.session_id, expected_state=SessionState.PREFILLED, expected_request=self.request_id
                )


async def run(settings: GatewaySettings) -> None:
    servicer = GatewayServicer()
    servicer.api_keys = ApiKeys.load(settings.api_keys_file)
    tls = server_tls_credentials(settings.tls_cert, settings.tls_key, settings.tls_client_ca)
    log.info("gateway: %s", servicer.api_keys.describe())
    if tls is None:
        log.info("gateway: no TLS (--tls-cert, --tls-key): requests, answers and API keys cross the network as is")
    stores: list[SessionStore] = []

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
        while True:  # serving means a request can complete: one prefill and one decode worker are up
            roles = {w.role for w in await store.list_workers()}
            if {"prefill", "decode"} <= roles:
                break
            await asyncio.sleep(0.2)
        log.info("gateway serving %s on %s:%d", name, settings.host, settings.port)

    async def shutdown() -> None:
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

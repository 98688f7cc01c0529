"""The decode service: adopts PREFILLED sessions and runs continuous batching over them (sequences join and leave at
every step), streaming each new token to the gateway. The step loop itself, which queues step n+1 on the device
before reading step n's tokens, is in step_loop.py.

It also resumes the sessions of a decode worker that died or stopped answering: the gateway calls Decode again with
every token it has streamed, this worker takes the session over (kvstore/lua/adopt.lua, takeover) once Redis says
its owner is gone, catches up the few tokens the dead worker had not recorded, and goes on.

    python -m services.decode.server --kvstore 127.0.0.1:50070 --port 50072
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time

import grpc

from kvrelay import trace
from kvrelay.ids import InvalidId, check_id, check_token_ids
from kvrelay.internal.v1 import decode_pb2_grpc
from kvrelay.sampling import params_from_proto
from kvrelay.settings import DecodeSettings
from kvrelay.v1 import common_pb2
from kvstore.sessions import (
    HeldSession,
    NotOwner,
    SessionError,
    SessionNotFound,
    SessionRecord,
    SessionState,
    WrongState,
)
from services.common.worker import LEASE_MS, Worker, main_for
from services.decode.step_loop import Failed, RunningSeq, StepLoop
from services.model.sampler import Sampler, make_generator
from services.split.board import DecodeReport, SplitBoard
from services.split.controller import TICK_S, PauseCredit, itl_budget_ms, split_on

log = logging.getLogger("kvrelay.decode")
SERVICE = "kvrelay.internal.v1.Decode"
PREFILL_POLL_S = 0.5  # a call waiting for its hand-off also tries to adopt this often (announcements can be lost)
CLAIM_MS = 5000  # a waiting call's claim on its session (kvstore/sessions.py), renewed by each of its polls
# A resume waits this long for the session's owner to be declared gone: a dead worker's registry entry expires within
# WORKER_TTL_MS (5 s) and its lease within LEASE_MS (10 s), whichever Redis sees first; a live owner keeps it.
RESUME_WAIT_S = LEASE_MS / 1000 + 2.0
RESUME_POLL_S = 0.2  # how often a resume tries the takeover again
# A call still waiting for its hand-off this long after Redis lost its state gives up with UNAVAILABLE: a session that
# was PREFILLED and offered to nobody yet had no holder to re-assert it, and would otherwise be waited for until the
# deadline. A prompt still queued at prefill (its session not created yet) may be cut off too: a retry serves it.
LOST_HANDOFF_S = 10.0


class HandoffLost(Exception):
    """Redis lost the state of the session this call waits for (see LOST_HANDOFF_S)."""


class DecodeWorker(StepLoop, Worker, decode_pb2_grpc.DecodeServicer):
    """kvrelay decode worker: adopts prefilled sessions, decodes them in one continuous batch, streams tokens."""

    role = "decode"

    def __init__(self, settings: DecodeSettings) -> None:
        super().__init__(settings)
        self.init_steps(overlap=settings.overlap)
        self.sampler = Sampler()
        self.awaiting: dict[str, set[asyncio.Event]] = {}  # session id -> notices of calls waiting for its hand-off
        # session id -> (record, when it arrived): sessions prefill handed to this worker's claim, for the waiting call
        self.handed: dict[str, tuple[SessionRecord, float]] = {}

    def load(self) -> dict:
        return {"active": len(self.running), "queued": 0}

    def progress(self) -> dict[str, int]:
        return {seq.session_id: seq.num_cached for seq in self.running if not (seq.finished or seq.lost)}

    def drop_lost(self, owned: set[str]) -> None:
        for seq in self.running:
            if seq.session_id not in owned:
                self.lose(seq)

    def held_sessions(self) -> list[HeldSession]:
        held = [
            HeldSession(seq.session_id, SessionState.DECODING, seq.num_cached, seq.request_id, tuple(seq.block_table))
            for seq in self.running
            if not (seq.finished or seq.lost or seq.cancelled)
        ]
        for record, _ in self.handed.values():  # handed to a call that has not taken it yet
            if not any(h.session_id == record.session_id for h in held):
                held.append(
                    HeldSession(
                        record.session_id,
                        SessionState.DECODING,
                        record.num_tokens,
                        record.request_id,
                        record.block_table,
                    )
                )
        return held

    def give_up_store(self, why: str) -> None:
        for seq in self.running:
            if not (seq.finished or seq.cancelled):
                log.warning("session %s: %s", seq.session_id, why)
                seq.out.put_nowait(Failed(grpc.StatusCode.UNAVAILABLE, why))
                seq.cancelled = seq.aborted = True  # freed (once Redis answers), never kept
        self.wakeup.set()

    async def Decode(self, request, context):  # noqa: N802
        received = time.perf_counter()
        if self.attached is None:
            await context.abort(grpc.StatusCode.UNAVAILABLE, "decode worker is still loading the model")
        try:
            params = self._check(request)
        except ValueError as exc:  # InvalidId is one too
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
        history = list(request.token_ids)
        num_generated = request.num_generated
        try:
            if request.await_prefill:
                record, received = await self._adopt_when_prefilled(request, history)
                history.append(record.first_token)  # prefill's first token: the first step writes its K/V
                num_generated += 1
            else:
                record = await self._resume(request, history)
        except SessionError as exc:
            code = grpc.StatusCode.NOT_FOUND if isinstance(exc, LookupError) else grpc.StatusCode.FAILED_PRECONDITION
            await context.abort(code, f"cannot adopt session {request.session_id}: {exc}")
        except HandoffLost as exc:
            await context.abort(grpc.StatusCode.UNAVAILABLE, str(exc))
        if request.await_prefill and len(history) != record.num_tokens + 1:
            await self.store.free(request.session_id, owner=self.worker_id)
            await context.abort(
                grpc.StatusCode.INVALID_ARGUMENT,
                f"token_ids has {len(history)} tokens; the pool holds {record.num_tokens} (+1 pending expected)",
            )
        seq = self._join(request, params, history, num_generated, record, received)
        first = True
        try:
            while True:
                message = await seq.out.get()
                if isinstance(message, grpc.StatusCode):
                    await context.abort(message, "no KV blocks left to continue this sequence")
                if isinstance(message, Failed):  # this sequence alone failed, or Abort ended it
                    await context.abort(message.code, message.details)
                if message.finish == common_pb2.FINISH_REASON_ERROR:  # the clients hear a failure as a status
                    await context.abort(grpc.StatusCode.INTERNAL, f"decode step failed for session {seq.session_id}")
                if first:
                    trace.mark(seq.session_id, "dc_yield")
                    first = False
                # context.write, not yield: the gateway cancelling the call cancels this coroutine wherever it
                # waits, so the finally below runs at once (an async generator suspended in a send would be closed
                # only when garbage collected, its sequence decoding on meanwhile)
                await context.write(message)
                if message.finish != common_pb2.FINISH_REASON_UNSPECIFIED:
                    return
        finally:
            if not seq.finished:
                seq.cancelled = True  # client gone or gateway cancelled: the step loop frees the blocks
                self.wakeup.set()

    def _check(self, request):
        """The request's sampling settings, or ValueError naming what is wrong (the same checks as the gateway's)."""
        params = params_from_proto(request.sampling)
        check_id("session_id", request.session_id)
        check_id("request_id", request.request_id, allow_empty=not request.await_prefill)
        vocab = self.attached.config.vocab_size
        check_token_ids("token_ids", request.token_ids, vocab, allow_empty=False)
        check_token_ids("sampling.stop_token_ids", params.stop_token_ids, vocab)
        if not 0 <= request.num_generated < params.max_tokens:
            raise ValueError(f"num_generated must be in [0, sampling.max_tokens), got {request.num_generated}")
        return params

    def _join(self, request, params, history, num_generated, record, received, cancelled=False) -> RunningSeq:
        """Add an adopted session to the running batch (a cancelled one only to be freed or released by the loop)."""
        seq = RunningSeq(
            request.session_id,
            params,
            history,
            record.num_tokens,
            num_generated,
            list(record.block_table),
            make_generator(params.seed, self.attached.runner.device),
            keep_session=request.keep_session,
            received=received,
            cancelled=cancelled,
            request_id=request.request_id,
        )
        self.running.append(seq)
        self.wakeup.set()
        trace.mark(seq.session_id, "dc_joined")
        return seq

    async def _resume(self, request, history: list[int]) -> SessionRecord:
        """Take over the request's session (after a hand-off nobody adopted, or from a decode worker that died or
        stopped answering), as soon as Redis allows it: at once when the session is PREFILLED or its owner's registry
        entry is gone, else polling until the owner is declared gone (RESUME_WAIT_S). Its num_tokens comes back at
        most len(history) - 1: the pool is trusted only for tokens the gateway has; the step loop writes the rest.
        """
        sid = request.session_id
        if any(seq.session_id == sid and not seq.finished for seq in self.running):
            raise WrongState(f"session {sid} is still decoding on this worker")
        deadline = time.monotonic() + RESUME_WAIT_S
        while True:
            try:
                record = await self._adopt(
                    request,
                    history,
                    takeover=True,
                    expected_request=request.request_id or None,
                    cap_tokens=len(history) - 1,
                )
                if record.num_tokens < len(history) - 1:
                    log.info(
                        "resumed session %s: %d tokens to write again before sampling",
                        sid,
                        len(history) - 1 - record.num_tokens,
                    )
                return record
            except NotOwner:
                if time.monotonic() > deadline:
                    raise
            await asyncio.sleep(RESUME_POLL_S)

    async def _adopt(self, request, history: list[int], **guards) -> SessionRecord:
        """adopt() the request's session; should the call end while Redis adopts it, the session is given back.

        extra_tokens=1: the block the first step writes into comes with the adoption (one round trip, not two).
        """
        adopting = asyncio.ensure_future(
            self.store.adopt(request.session_id, self.worker_id, LEASE_MS, extra_tokens=1, **guards)
        )
        try:
            return await asyncio.shield(adopting)
        except asyncio.CancelledError:
            # Cancelled mid-adoption: once it lands, the session is ours, and nobody else would ever free it.
            adopting.add_done_callback(lambda task: self._give_back(task, request, history))
            raise

    def _give_back(self, adopting: asyncio.Future, request, history: list[int]) -> None:
        if adopting.cancelled() or adopting.exception() is not None:
            return
        record = adopting.result()
        params = params_from_proto(request.sampling)
        self._join(request, params, history, 0, record, time.perf_counter(), cancelled=True)

    async def _adopt_when_prefilled(self, request, history: list[int]) -> tuple[SessionRecord, float]:
        """Wait until prefill offers this request's session, take it; also when it arrived.

        Each attempt to adopt also claims the session (kvstore/sessions.py): when prefill records PREFILLED, Redis
        hands the session to this worker in the same step and announces its record (handoff_listener puts it in
        `handed` and sets our notice), with no adopt round trip. The call also tries at once, for a session offered
        before it arrived, and every PREFILL_POLL_S, for an announcement lost with a connection. A call that ends
        without its session gives up its claim (and a session handed to it meanwhile).
        """
        sid = request.session_id
        notice = asyncio.Event()
        self.awaiting.setdefault(sid, set()).add(notice)
        taken = False
        epoch, lost_at = self.epoch, None
        try:
            while True:
                notice.clear()
                handed = self.handed.pop(sid, None)
                if handed is not None:
                    if handed[0].request_id == request.request_id:
                        taken = True
                        return handed
                    self._unclaim(sid, handed[0].request_id)  # an earlier request's, whose call is gone
                offered = time.perf_counter()
                try:
                    record = await self._adopt(
                        request,
                        history,
                        expected_state=SessionState.PREFILLED,
                        expected_request=request.request_id,
                        claim_ms=CLAIM_MS,
                    )
                    taken = True
                    trace.mark(sid, "dc_adopt_sent", offered)
                    trace.mark(sid, "dc_adopted")
                    return record, offered
                except (WrongState, SessionNotFound):
                    # not offered yet: still being prefilled, or not even admitted; or lost with Redis' state
                    if self.epoch != epoch:
                        lost_at = lost_at or time.monotonic()
                        if time.monotonic() - lost_at > LOST_HANDOFF_S:
                            raise HandoffLost(
                                "the session store lost this request's session (Redis restarted or was flushed) "
                                "before its hand-off; retry"
                            ) from None
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(notice.wait(), PREFILL_POLL_S)
        finally:
            waiting = self.awaiting[sid]
            waiting.discard(notice)
            if not waiting:
                del self.awaiting[sid]
            late = self.handed.get(sid)
            if late is not None and late[0].request_id == request.request_id:
                # taken by a poll while its announcement came too, or announced to a call that is ending now (its
                # unclaim below frees the session)
                del self.handed[sid]
            if not taken:
                # Cancelled (an adoption in flight is _adopt's to give back) or failed: the claim must go, and a
                # session prefill handed to it meanwhile is freed.
                self._unclaim(sid, request.request_id)

    def _unclaim(self, sid: str, request_id: str) -> None:
        async def unclaim() -> None:
            try:
                await self.store.unclaim(sid, self.worker_id, request_id)
            except Exception:  # the claim expires by itself; a handed session's lease is renewed, so say so
                log.exception("could not give up the claim on session %s (request %s)", sid, request_id)

        asyncio.ensure_future(unclaim())

    async def handoff_listener(self) -> None:
        """Redis' hand-off announcements: a session handed to this worker's claim goes to the call waiting for it
        (or back, when that call is gone); a session offered to anyone wakes the calls waiting for it to adopt it."""
        while True:
            try:
                async for item in self.store.handoffs(self.worker_id):
                    if isinstance(item, SessionRecord):
                        sid = item.session_id
                        trace.mark(sid, "dc_handed")
                        if sid in self.awaiting:
                            self.handed[sid] = (item, time.perf_counter())
                        elif not any(seq.session_id == sid for seq in self.running):
                            # its call gave up before the hand-off (a call that took the session by a poll while
                            # this announcement was late has it running: nothing to do then)
                            self._unclaim(sid, item.request_id)
                    else:
                        sid = item
                        trace.mark(sid, "dc_notice")
                    for notice in self.awaiting.get(sid, ()):
                        notice.set()
            except Exception:  # Redis hiccup: the waiting calls poll meanwhile; subscribe again
                log.exception("hand-off announcements lost their Redis subscription; subscribing again")
            await asyncio.sleep(1.0)

    def loops(self) -> list:
        """The coroutines a decode worker runs beside its gRPC handlers."""
        device = self.attached.runner.device
        loops = [self.step_loop(), self.handoff_listener()]
        budget = itl_budget_ms(self.settings, device)
        if budget < float("inf"):  # an ITL SLO: publish the ITL (prefill's controller, its overload check)
            loops.append(self.split_loop())
        if split_on(self.settings, device):
            self.credit = PauseCredit(budget)
            loops.append(self.pass_listener())
        return loops

    async def split_loop(self) -> None:
        """Every TICK_S: publish the ITL this worker's streams see (services/split), for prefill's controller."""
        board = SplitBoard(self.store)
        while not self.stopping.is_set():
            try:
                itl = self.itl.mean_ms(time.perf_counter())
                await board.publish(self.role, self.worker_id, DecodeReport(itl, len(self.running)))
            except Exception as exc:  # noqa: BLE001 - the split is an optimisation: serving goes on without it
                log.debug("split tick failed: %s: %s", type(exc).__name__, exc)
            await asyncio.sleep(TICK_S)

    async def pass_listener(self) -> None:
        """Prefill's pass announcements, for the step loop's pauses. While the subscription is down no pass is
        known, so decode never waits."""
        board = SplitBoard(self.store)
        while not self.stopping.is_set():
            try:
                async for worker, expected_ms in board.passes():
                    self.prefill_pass(worker, expected_ms)
            except Exception as exc:  # noqa: BLE001
                log.debug("pass announcements lost (%s: %s); subscribing again", type(exc).__name__, exc)
            for worker in list(self.prefill_passes):
                self.prefill_pass(worker, None)
            await asyncio.sleep(1.0)

    async def Abort(self, request, context):  # noqa: N802
        try:
            check_id("session_id", request.session_id)
        except InvalidId as exc:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
        for seq in self.running:
            if seq.session_id == request.session_id and not seq.finished:
                if not seq.cancelled:  # its Decode call ends now, with CANCELLED (decode.proto)
                    why = f": {request.reason}" if request.reason else ""
                    seq.out.put_nowait(Failed(grpc.StatusCode.CANCELLED, f"session {seq.session_id} aborted{why}"))
                seq.cancelled = seq.aborted = True  # the step loop frees its blocks before its next step
                self.wakeup.set()
                return common_pb2.AbortResponse(found=True, blocks_freed=len(seq.block_table))
        return common_pb2.AbortResponse(found=False)

    def prepare(self) -> None:
        self.attached.runner.enable_cuda_graphs(self.settings.max_decode_batch, self.attached.max_model_len)

    def main_sync(self) -> None:
        asyncio.run(self.run([(decode_pb2_grpc.add_DecodeServicer_to_server, self)], [SERVICE]))


def main() -> None:
    main_for(DecodeWorker, DecodeSettings)


if __name__ == "__main__":
    main()

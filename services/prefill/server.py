"""The prefill service: batches concurrent prompts (varlen, chunked under a token budget), writes their K/V into the
shared pool, samples each prompt's first token and hands the session over as PREFILLED.

A request the gateway retries because the prefill worker serving it died finds its session PREFILLING under the dead
worker (a named session keeps its id; an anonymous one is retried under a new one): once Redis says that worker is
gone, this worker takes the session over (kvstore/lua/adopt.lua, takeover) and prefills the prompt again over the
prefix its earlier turns left in the pool.

    python -m services.prefill.server --kvstore 127.0.0.1:50070 --port 50071
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass, field

import grpc
from redis.exceptions import RedisError

from kvrelay import trace
from kvrelay.ids import InvalidId, check_id, check_token_ids
from kvrelay.internal.v1 import prefill_pb2, prefill_pb2_grpc
from kvrelay.sampling import SamplingParams, params_from_proto
from kvrelay.settings import PrefillSettings
from kvrelay.v1 import common_pb2
from kvstore.allocator import OutOfBlocks
from kvstore.sessions import (
    HeldSession,
    NotOwner,
    PoolNotInitialized,
    PoolRecovering,
    SessionError,
    SessionState,
    StoreUnavailable,
)
from services.common.convert import FINISH, logprob_to_proto
from services.common.worker import HANDOFF_LEASE_MS, LEASE_MS, Worker, main_for, sync_device
from services.model.runner import SeqChunk
from services.model.sampler import Sampler, finish_reason, make_generator
from services.scheduler import (
    Admission,
    PromptProgress,
    fits_context,
    pack_prefill,
    queue_full,
    reusable_prefix,
)
from services.split.board import PrefillReport, SplitBoard
from services.split.controller import TICK_S, Observation, PrefillRate, Slo, SplitController, refusal, slo_and_split
from services.split.mechanism import pacing_pause_s, prefill_gpu

log = logging.getLogger("kvrelay.prefill")
SERVICE = "kvrelay.internal.v1.Prefill"
# A retried request waits this long for the worker that held its session to be declared gone (its registry entry
# expires within WORKER_TTL_MS, its lease within LEASE_MS); a live holder keeps it (FAILED_PRECONDITION).
TAKEOVER_WAIT_S = LEASE_MS / 1000 + 2.0
FENCED_POLL_S = 0.05  # while the worker may not act (no heartbeat lately), it looks again this often


class Aborted(Exception):
    """A job's future holds this when Abort stopped it: its Prefill call ends with CANCELLED."""


class StateLost(Exception):
    """Redis lost the job's session (restarted without persistence, flushed) before its hand-off: the call ends with
    UNAVAILABLE, and the gateway prefills it again (services/common/worker.py has the recovery)."""


@dataclass(eq=False)
class PrefillJob:
    session_id: str
    request_id: str
    token_ids: list[int]
    params: SamplingParams
    future: asyncio.Future
    arrived: float = field(default_factory=time.perf_counter)
    block_table: list[int] = field(default_factory=list)
    progress: int = 0  # prompt tokens already written to the pool
    started: float | None = None
    cancelled: bool = False
    keep_session: bool = False  # multi-turn: leave the KV in the pool (IDLE) when the request ends here
    cached: int = 0  # prompt tokens reused from the session's earlier turns


def prefill_batch(ready: list[PrefillJob], max_batch_tokens: int) -> tuple[list[PrefillJob], list[SeqChunk]]:
    """The next forward pass over the jobs whose blocks are allocated (in admission order), packed by the scheduler:
    the jobs it takes and their chunks. Advances each taken job's progress past its chunk."""
    plan = pack_prefill([PromptProgress(len(job.token_ids), job.progress) for job in ready], max_batch_tokens)
    batch, chunks = [], []
    for chunk in plan:
        job = ready[chunk.index]
        chunks.append(SeqChunk(tuple(job.token_ids[chunk.start : chunk.end]), chunk.start, tuple(job.block_table)))
        batch.append(job)
        job.started = job.started or time.perf_counter()
        job.progress = chunk.end
    return batch, chunks


class PrefillWorker(Worker, prefill_pb2_grpc.PrefillServicer):
    """kvrelay prefill worker: batches prompts, writes their K/V into the pool, hands sessions to decode."""

    role = "prefill"

    def __init__(self, settings: PrefillSettings) -> None:
        super().__init__(settings)
        self.waiting: list[PrefillJob] = []  # no blocks yet
        self.ready: list[PrefillJob] = []  # blocks allocated, being computed (chunk by chunk)
        self.wakeup = asyncio.Event()
        self.sampler = Sampler()
        self.slo = Slo(0, 0)  # set in prepare(), where the device is known
        self.reads_decode = False
        self.rate = PrefillRate()  # the admission's and the controller's measure of this worker's speed
        self.controller: SplitController | None = None
        self.board: SplitBoard | None = None  # with the controller: decode hears of each pass through it
        self.decode_itl_ms: float | None = None  # decode's mean ITL as last read (the admission's overload check)
        self.last_pass_s = 0.0  # the last forward pass's compute time: what pacing idles after, in proportion

    def queued_tokens(self) -> int:
        """Prompt tokens this worker has still to compute (an IDLE session's reusable prefix counted as new)."""
        return sum(len(j.token_ids) - j.progress for j in self.ready) + sum(len(j.token_ids) for j in self.waiting)

    def load(self) -> dict:
        return {"active": len(self.ready), "queued": len(self.waiting)}

    def drop_lost(self, owned: set[str]) -> None:
        for job in [j for j in self.ready if j.session_id not in owned]:
            log.warning("session %s was taken over by another worker; dropping its prefill", job.session_id)
            self.ready.remove(job)
            if not job.future.done():
                job.future.set_exception(SessionError(f"session {job.session_id} was taken over by another worker"))

    def held_sessions(self) -> list[HeldSession]:
        # num_tokens 0: a PREFILLING session's K/V is trusted only once it is PREFILLED
        return [
            HeldSession(j.session_id, SessionState.PREFILLING, 0, j.request_id or None, tuple(j.block_table))
            for j in self.ready
            if not j.cancelled and j.block_table
        ]

    def give_up_store(self, why: str) -> None:
        for job in self.waiting + self.ready:
            if not job.future.done():
                job.future.set_exception(StoreUnavailable(why))
            job.cancelled = True  # the batch loop drops it (and frees its blocks once Redis answers)
        self.wakeup.set()

    def prepare(self) -> None:
        self.attached.runner.enable_prefill_graphs(self.settings.prefill_graph_tokens, self.attached.max_model_len)
        self.slo, split = slo_and_split(self.settings, self.attached.runner.device)
        self.controller = SplitController(self.slo) if split else None
        # AMD: each pass on the CU-mask stream of the current rung's share (the own stream elsewhere, or on failure)
        device = self.attached.runner.device
        self.gpu = prefill_gpu(self.gpu, device, split, lambda: self.controller.split.prefill_share)
        self.board = SplitBoard(self.store) if split else None
        self.reads_decode = split or self.slo.itl_ms > 0  # the tick loop runs: the controller, the overload check

    async def Prefill(self, request, context):  # noqa: N802
        if self.attached is None:
            await context.abort(grpc.StatusCode.UNAVAILABLE, "prefill worker is still loading the model")
        ids = list(request.token_ids)
        try:
            params = params_from_proto(request.sampling)
            check_id("session_id", request.session_id)
            check_id("request_id", request.request_id, allow_empty=True)
            vocab = self.attached.config.vocab_size
            check_token_ids("token_ids", ids, vocab, allow_empty=False)
            check_token_ids("sampling.stop_token_ids", params.stop_token_ids, vocab)
        except ValueError as exc:  # InvalidId is one too
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
        limit = self.attached.max_model_len
        if not fits_context(len(ids), limit):
            await context.abort(
                grpc.StatusCode.INVALID_ARGUMENT, f"prompt of {len(ids)} tokens; the context is {limit}"
            )
        if queue_full(len(self.waiting)):
            await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, "prefill queue is full; retry later")
        duty = self.controller.split.prefill_duty if self.controller else 1.0
        why = refusal(self.queued_tokens(), len(ids), self.rate, self.slo, duty, self.decode_itl_ms)
        if why is not None:
            await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, why)
        job = PrefillJob(
            request.session_id, request.request_id, ids, params, asyncio.get_running_loop().create_future()
        )
        job.keep_session = request.keep_session
        self.waiting.append(job)
        self.wakeup.set()
        try:
            return await job.future
        except asyncio.CancelledError:
            job.cancelled = True  # the batch loop frees its blocks; a running forward pass cannot be interrupted
            job.future.cancel()  # nobody waits for it any more
            self.wakeup.set()
            raise
        except Aborted as exc:
            await context.abort(grpc.StatusCode.CANCELLED, str(exc))
        except OutOfBlocks as exc:
            await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, f"no KV blocks for this prompt: {exc}")
        except SessionError as exc:
            await context.abort(grpc.StatusCode.FAILED_PRECONDITION, str(exc))
        except StoreUnavailable as exc:  # "session store unreachable at ...": the gateway passes it on as it is
            await context.abort(grpc.StatusCode.UNAVAILABLE, str(exc))
        except StateLost as exc:
            await context.abort(grpc.StatusCode.UNAVAILABLE, str(exc))
        except RedisError as exc:
            await context.abort(grpc.StatusCode.UNAVAILABLE, f"Redis is unavailable ({type(exc).__name__}: {exc})")
        except Exception as exc:  # this prompt's own failure (its neighbours in the batch went on)
            await context.abort(grpc.StatusCode.INTERNAL, f"prefill failed: {type(exc).__name__}: {exc}")

    async def Abort(self, request, context):  # noqa: N802
        try:
            check_id("session_id", request.session_id)
        except InvalidId as exc:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
        for job in self.waiting + self.ready:
            if job.session_id == request.session_id and not job.future.done():
                # The call ends now (prefill.proto: CANCELLED); the batch loop frees the blocks, after the forward
                # pass that may be running over them.
                job.cancelled = True
                why = f": {request.reason}" if request.reason else ""
                job.future.set_exception(Aborted(f"prefill of session {job.session_id} aborted{why}"))
                self.wakeup.set()
                return common_pb2.AbortResponse(found=True)
        return common_pb2.AbortResponse(found=False)

    async def _fail(self, job: PrefillJob, exc: Exception) -> None:
        """This job alone failed: its call hears why, its blocks (if it got any) go back, the others go on."""
        if job in self.ready:
            self.ready.remove(job)
        if isinstance(exc, RedisError):
            log.warning("prefill of session %s failed: %s: %s", job.session_id, type(exc).__name__, exc)
        else:
            log.error("prefill of session %s failed", job.session_id, exc_info=exc)
        if not job.future.done():
            job.future.set_exception(exc)
        await self._free(job)

    async def _free(self, job: PrefillJob) -> None:
        try:
            await self.store.free(job.session_id, owner=self.worker_id)
        except SessionError:
            pass  # not ours (any more): nothing of it to free
        except Exception as exc:  # Redis: the session's lease expires and reclaim_expired frees it
            log.warning("could not free session %s (%s: %s)", job.session_id, type(exc).__name__, exc)

    async def _admit(self) -> None:
        """Give waiting prompts their blocks, oldest first; one that cannot get them waits (bounded) or is refused."""
        geometry = self.attached.pool.geometry
        policy = Admission(geometry.block_size, geometry.num_blocks, self.settings.block_wait_s)
        still = []
        for job in self.waiting:
            if job.cancelled or job.future.done():
                if not job.future.done():
                    job.future.set_exception(Aborted(f"prefill of session {job.session_id} cancelled"))
                continue
            need = policy.blocks_for(len(job.token_ids))
            if policy.never_fits(need):
                job.future.set_exception(OutOfBlocks(need, geometry.num_blocks))
                continue
            try:
                record = await self.store.get(job.session_id)
                if record is None:
                    job.block_table = await self.store.allocate(
                        job.session_id, need, self.worker_id, LEASE_MS, request_id=job.request_id, have=0
                    )
                else:
                    await self._resume(job, record, need)
                self.ready.append(job)
            except OutOfBlocks as exc:
                if policy.keeps_waiting(time.perf_counter() - job.arrived):
                    still.append(job)
                else:
                    job.future.set_exception(exc)
            except (PoolRecovering, PoolNotInitialized):  # Redis lost its state: blocks come once it has recovered
                still.append(job)
            except NotOwner as exc:  # a retry whose session's holder is not declared gone yet
                if time.perf_counter() - job.arrived < TAKEOVER_WAIT_S:
                    still.append(job)
                else:
                    job.future.set_exception(exc)
            except SessionError as exc:
                job.future.set_exception(exc)
            except Exception as exc:  # Redis, or a bug: this job fails, the others are admitted
                await self._fail(job, exc)
        self.waiting = still

    async def _resume(self, job: PrefillJob, record, need: int) -> None:
        """A session kept IDLE from an earlier turn: take it, reuse the longest prefix its blocks hold, grow it.

        Or this very request's session, left PREFILLING by a prefill worker that died (the gateway retries): take it
        over once that worker is gone (NotOwner until then). Its earlier turns' tokens and num_tokens are as they
        were, and the dead worker wrote only past the prefix this prompt reuses (the same prompt, the same prefix),
        so that prefix is still good.
        """
        retry = record.state == SessionState.PREFILLING and record.request_id == job.request_id != ""
        if retry and any(j.session_id == job.session_id for j in self.ready):
            retry = False  # retried on this very worker while the first attempt still runs here
        if record.state != SessionState.IDLE and not retry:
            raise SessionError(f"session {job.session_id} has a request in flight ({record.state.value})")
        record = await self.store.adopt(
            job.session_id,
            self.worker_id,
            LEASE_MS,
            expected_state=record.state,
            state=SessionState.PREFILLING,
            expected_request=job.request_id if retry else None,
            takeover=retry,
            set_request=job.request_id,
        )
        if retry:
            log.info(
                "took over session %s (request %s) from a prefill worker that is gone", job.session_id, job.request_id
            )
        cached = record.token_ids()[: record.num_tokens]  # adopt's reply holds them: no round trip
        reuse = reusable_prefix(cached, job.token_ids)
        job.block_table = list(record.block_table)
        missing = need - len(job.block_table)
        if missing > 0:
            try:
                job.block_table += await self.store.allocate(
                    job.session_id, missing, self.worker_id, LEASE_MS, create=False, have=len(job.block_table)
                )
            except OutOfBlocks:
                await self.store.release(job.session_id, self.worker_id)  # back to IDLE; retried next round
                raise
        job.progress = job.cached = reuse

    async def _finish_here(self, job: PrefillJob) -> None:
        """The request ended at prefill (or was cancelled): keep the session for the next turn, or free it."""
        if job.keep_session and not job.cancelled:
            n = len(job.token_ids)
            await self.store.update(job.session_id, self.worker_id, None, num_tokens=n, tokens=job.token_ids)
            await self.store.release(job.session_id, self.worker_id)
        else:
            await self.store.free(job.session_id, owner=self.worker_id)

    async def _drop_cancelled(self) -> None:
        for job in [j for j in self.ready if j.cancelled]:
            self.ready.remove(job)
            if not job.future.done():
                job.future.set_exception(Aborted(f"prefill of session {job.session_id} cancelled"))
            await self._free(job)

    async def batch_loop(self) -> None:
        budget = self.settings.max_batch_tokens
        while True:
            await self.wakeup.wait()
            self.wakeup.clear()
            try:
                await self._step(budget)
            except Exception as exc:  # the last resort (each job's own failures fail it alone, in _step)
                log.exception("prefill batch failed")
                for job in list(self.ready):
                    await self._fail(job, exc)
            if self.ready or self.waiting:
                self.wakeup.set()
                pause = pacing_pause_s(self.last_pass_s, self.controller.split.prefill_duty) if self.controller else 0
                self.last_pass_s = 0.0
                await asyncio.sleep(pause if self.ready else max(pause, 0.05))  # waiting only for blocks: poll gently

    async def split_loop(self) -> None:
        """Every TICK_S: read decode's ITL (the admission's overload check), decide the split from it and this
        queue's predicted TTFT, and publish the rung. A Redis failure skips a tick; the split stays as it was, and
        the overload check forgets decode's ITL (it never refuses on a stale reading)."""
        board = SplitBoard(self.store)
        while not self.stopping.is_set():
            try:
                self.decode_itl_ms = None
                self.decode_itl_ms = await board.decode_itl_ms()
                if self.controller is None:
                    await asyncio.sleep(TICK_S)
                    continue
                duty = self.controller.split.prefill_duty
                queue_ms = self.rate.predict_ms(self.queued_tokens(), duty)
                obs = Observation(time.monotonic(), self.decode_itl_ms, queue_ms)
                before = self.controller.level
                split = self.controller.decide(obs)
                if self.controller.level != before:
                    log.info(
                        "split: level %d -> %d (prefill duty %.2f): queue TTFT %.0f ms, decode ITL %s ms",
                        before, self.controller.level, split.prefill_duty, obs.queue_ttft_ms,
                        "-" if obs.decode_itl_ms is None else f"{obs.decode_itl_ms:.1f}",
                    )  # fmt: skip
                active = bool(self.ready or self.waiting)
                report = PrefillReport(active, self.controller.level)
                await board.publish(self.role, self.worker_id, report)
            except Exception as exc:  # noqa: BLE001 - the split is an optimisation: serving goes on without it
                log.debug("split tick failed: %s: %s", type(exc).__name__, exc)
            await asyncio.sleep(TICK_S)

    def _compute(self, chunks: list[SeqChunk], done: list[int], jobs: list[PrefillJob]):
        """Forward pass, first tokens of the prompts that completed, and a stream sync (on the worker's stream)."""
        runner = self.attached.runner
        logits = runner.forward(chunks)
        out = None
        if done:
            out = self.sampler(
                logits[done],
                [j.params for j in jobs],
                [make_generator(j.params.seed, logits.device) for j in jobs],
                [j.token_ids for j in jobs],
            )
        sync_device(runner.device)  # K/V complete and visible before anyone hears of them
        return out

    async def _step(self, budget: int) -> None:
        await self._admit()
        await self._drop_cancelled()
        if not self.ready:
            return
        if not self.may_act():  # no heartbeat reached Redis lately: another worker may take these sessions over
            await asyncio.sleep(FENCED_POLL_S)
            return
        batch, chunks = prefill_batch(self.ready, budget)
        for jobs, out in await self._forward(batch, chunks):
            for row, job in enumerate(jobs):
                try:
                    await self._hand_off(job, out, row)
                except Exception as exc:  # this job's Redis call (or a bug in its reply): it alone fails
                    if isinstance(exc, SessionError | PoolNotInitialized) and await self.store_lost():
                        exc = StateLost(
                            f"the session store lost this request's session (Redis restarted or was flushed) "
                            f"before its hand-off; retry ({exc})"
                        )
                    await self._fail(job, exc)

    async def _forward(self, batch: list[PrefillJob], chunks: list[SeqChunk]) -> list[tuple[list[PrefillJob], object]]:
        """The forward pass over `chunks`; (jobs whose prompt completed, their first tokens) groups.

        When the pass over several prompts raises, one of them may be the cause: each chunk runs again alone (it
        writes the same K/V into the same slots), so a prompt that fails alone fails, and only it."""
        done = [i for i, job in enumerate(batch) if job.progress == len(job.token_ids)]
        tokens = sum(len(c.token_ids) for c in chunks)
        try:
            announced = await self._announce(self.rate.predict_ms(tokens))
            started = time.perf_counter()
            try:
                out = await asyncio.to_thread(self.gpu.run, self._compute, chunks, done, [batch[i] for i in done])
            finally:
                if announced:
                    await self._announce(None)
            self.last_pass_s = time.perf_counter() - started
            self.rate.observe(tokens, self.last_pass_s)
            return [([batch[i] for i in done], out)] if done else []
        except Exception as exc:
            if len(batch) == 1:
                await self._fail(batch[0], exc)
                return []
            log.warning("prefill pass over %d prompts failed (%s); running them one at a time", len(batch), exc)
        groups = []
        for job, chunk in zip(batch, chunks, strict=True):
            complete = [0] if job.progress == len(job.token_ids) else []
            try:
                out = await asyncio.to_thread(self.gpu.run, self._compute, [chunk], complete, [job] if complete else [])
            except Exception as exc:
                await self._fail(job, exc)
                continue
            if complete:
                groups.append(([job], out))
        return groups

    async def _announce(self, expected_ms: float | None) -> bool:
        """Tell decode workers a pass starts (how long it should take) or, with None, ends, so they may pause for it
        (services/split). A start is told only once prefill's speed is measured (expected_ms > 0); whether it was
        told is returned, so that its end is told exactly then. A Redis failure only costs decode's pause."""
        if self.board is None or (expected_ms is not None and expected_ms <= 0):
            return False
        try:
            await self.board.announce_pass(self.worker_id, expected_ms)
            return True
        except Exception as exc:  # noqa: BLE001 - an optimisation: the pass runs either way
            log.debug("pass announcement failed: %s: %s", type(exc).__name__, exc)
            return False

    async def _hand_off(self, job: PrefillJob, out, row: int) -> None:
        """A prompt completed with its first token in `out`'s row: hand the session to decode (or end it here), then
        reply."""
        eos = self.attached.config.eos_token_ids
        self.ready.remove(job)
        trace.mark(job.session_id, "pf_arrived", job.arrived)
        trace.mark(job.session_id, "pf_started", job.started)
        trace.mark(job.session_id, "pf_computed")
        token = out.token_ids[row]
        full = len(job.token_ids) + 1 >= self.attached.max_model_len
        reason = finish_reason(token, 1, job.params, eos, full)
        if job.cancelled or reason is not None:
            await self._finish_here(job)
        else:
            # Hand-off: PREFILLED with a lease nobody renews, so a session no decode worker adopts comes back.
            # The same call tells the decode worker waiting for this request (request_id) to adopt it now.
            await self.store.update(
                job.session_id,
                self.worker_id,
                SessionState.PREFILLED,
                lease_ms=HANDOFF_LEASE_MS,
                num_tokens=len(job.token_ids),
                first_token=token,
                request_id=job.request_id,
            )
            trace.mark(job.session_id, "pf_offered")
        if job.future.done():
            return
        now = time.perf_counter()
        response = prefill_pb2.PrefillResponse(
            first_token_id=token,
            num_tokens=len(job.token_ids),
            finish=FINISH[reason],
            queue_ms=(job.started - job.arrived) * 1e3,
            prefill_ms=(now - job.started) * 1e3,
            cached_tokens=job.cached,
        )
        lp = logprob_to_proto(out, row)
        if lp is not None:
            response.logprob.CopyFrom(lp)
        job.future.set_result(response)
        trace.mark(job.session_id, "pf_replied")

    def main_sync(self) -> None:
        asyncio.run(self.run([(prefill_pb2_grpc.add_PrefillServicer_to_server, self)], [SERVICE]))

    def loops(self) -> list:
        return [self.batch_loop()] + ([self.split_loop()] if self.reads_decode else [])


def main() -> None:
    main_for(PrefillWorker, PrefillSettings)


if __name__ == "__main__":
    main()

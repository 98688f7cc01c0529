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

from kvrelay import trace
from kvrelay.internal.v1 import prefill_pb2, prefill_pb2_grpc
from kvrelay.sampling import SamplingParams, params_from_proto
from kvrelay.settings import PrefillSettings
from kvrelay.v1 import common_pb2
from kvstore.allocator import OutOfBlocks
from kvstore.sessions import NotOwner, SessionError, SessionState
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

log = logging.getLogger("kvrelay.prefill")
SERVICE = "kvrelay.internal.v1.Prefill"
# A retried request waits this long for the worker that held its session to be declared gone (its registry entry
# expires within WORKER_TTL_MS, its lease within LEASE_MS); a live holder keeps it (FAILED_PRECONDITION).
TAKEOVER_WAIT_S = LEASE_MS / 1000 + 2.0
FENCED_POLL_S = 0.05  # while the worker may not act (no heartbeat lately), it looks again this often


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

    def load(self) -> dict:
        return {"active": len(self.ready), "queued": len(self.waiting)}

    def drop_lost(self, owned: set[str]) -> None:
        for job in [j for j in self.ready if j.session_id not in owned]:
            log.warning("session %s was taken over by another worker; dropping its prefill", job.session_id)
            self.ready.remove(job)
            if not job.future.done():
                job.future.set_exception(SessionError(f"session {job.session_id} was taken over by another worker"))

    def prepare(self) -> None:
        self.attached.runner.enable_prefill_graphs(self.settings.prefill_graph_tokens, self.attached.max_model_len)

    async def Prefill(self, request, context):  # noqa: N802
        if self.attached is None:
            await context.abort(grpc.StatusCode.UNAVAILABLE, "prefill worker is still loading the model")
        try:
            params = params_from_proto(request.sampling)
        except ValueError as exc:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
        ids = list(request.token_ids)
        limit = self.attached.max_model_len
        if not fits_context(len(ids), limit):
            await context.abort(
                grpc.StatusCode.INVALID_ARGUMENT, f"prompt of {len(ids)} tokens; the context is {limit}"
            )
        if queue_full(len(self.waiting)):
            await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, "prefill queue is full; retry later")
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
            self.wakeup.set()
            raise
        except OutOfBlocks as exc:
            await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, f"no KV blocks for this prompt: {exc}")
        except SessionError as exc:
            await context.abort(grpc.StatusCode.FAILED_PRECONDITION, str(exc))

    async def Abort(self, request, context):  # noqa: N802
        for job in self.waiting + self.ready:
            if job.session_id == request.session_id:
                job.cancelled = True
                self.wakeup.set()
                return common_pb2.AbortResponse(found=True)
        return common_pb2.AbortResponse(found=False)

    async def _admit(self) -> None:
        """Give waiting prompts their blocks, oldest first; one that cannot get them waits (bounded) or is refused."""
        geometry = self.attached.pool.geometry
        policy = Admission(geometry.block_size, geometry.num_blocks, self.settings.block_wait_s)
        still = []
        for job in self.waiting:
            if job.cancelled or job.future.done():
                continue
            need = policy.blocks_for(len(job.token_ids))
            if policy.never_fits(need):
                job.future.set_exception(OutOfBlocks(need, geometry.num_blocks))
                continue
            try:
                record = await self.store.get(job.session_id)
                if record is None:
                    job.block_table = await self.store.allocate(
                        job.session_id, need, self.worker_id, LEASE_MS, request_id=job.request_id
                    )
                else:
                    await self._resume(job, record, need)
                self.ready.append(job)
            except OutOfBlocks as exc:
                if policy.keeps_waiting(time.perf_counter() - job.arrived):
                    still.append(job)
                else:
                    job.future.set_exception(exc)
            except NotOwner as exc:  # a retry whose session's holder is not declared gone yet
                if time.perf_counter() - job.arrived < TAKEOVER_WAIT_S:
                    still.append(job)
                else:
                    job.future.set_exception(exc)
            except SessionError as exc:
                job.future.set_exception(exc)
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
                    job.session_id, missing, self.worker_id, LEASE_MS, create=False
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
            await self.store.free(job.session_id, owner=self.worker_id)

    async def batch_loop(self) -> None:
        budget = self.settings.max_batch_tokens
        while True:
            await self.wakeup.wait()
            self.wakeup.clear()
            try:
                await self._step(budget)
            except Exception as exc:  # a failing batch fails its requests, not the server
                log.exception("prefill batch failed")
                for job in self.ready:
                    if not job.future.done():
                        job.future.set_exception(exc)
                    await self.store.free(job.session_id)
                self.ready = []
            if self.ready or self.waiting:
                self.wakeup.set()
                await asyncio.sleep(0 if self.ready else 0.05)  # waiting only for blocks: poll gently

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
        done = [i for i, job in enumerate(batch) if job.progress == len(job.token_ids)]
        jobs = [batch[i] for i in done]
        out = await asyncio.to_thread(self.gpu.run, self._compute, chunks, done, jobs)
        if not done:
            return
        eos = self.attached.config.eos_token_ids
        for row, job in enumerate(jobs):
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
                continue
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
        return [self.batch_loop()]


def main() -> None:
    main_for(PrefillWorker, PrefillSettings)


if __name__ == "__main__":
    main()

"""The decode worker's step loop: continuous batching, with the host one step ahead of the device.

Overlap (the default; `--no-overlap` turns it off): when step n+1 runs the same sequences in the same order as step n,
it is queued with step n's sampled ids as its input ids, still on the device, *before* the host waits for step n.
The host then reads step n's ids (that sync happens while step n+1 runs), streams them and checks for finishes,
then prepares step n+2 while step n+1 runs: as long as that host work takes less than a step, the device never
waits for it.

Step n+1 is queued before anyone knows whether step n sampled EOS, so a sequence may end at step n while step n+1
still computes a row for it. That row is ignored, and the sequence's blocks are freed (or released for its next turn)
only once step n+1 has completed, because step n+1 writes K/V into them. The client hears its final token at once,
except a kept session (multi-turn): its final message waits for the release, so a next turn sent at once finds the
session IDLE.

Whenever the batch changes (a sequence joins, is paused, is cancelled, ends by length at step n, or a row needs the
repetition penalty, which reads the whole history on the host), the loop waits for step n first and queues the next
step from host token ids: at most one step is in flight.

A resumed sequence (its decode worker died; the gateway sent every token it had streamed) may hold more tokens than
the pool has K/V for: the dead worker records its progress only with each heartbeat. It catches up one step per token,
the step's input the known token and its sample thrown away, exactly the steps the dead worker ran, so the K/V it
writes and every later logit are those of an uninterrupted run; then it samples again.

The loop runs a step only while the worker may act on its sessions (`Worker.may_act`: its heartbeats reach Redis), so
that a worker cut off from Redis has stopped writing before another may take its sessions over. A Redis call of the
loop's own that finds Redis away, or its state lost (the pool re-created, the session not re-asserted yet), pauses the
loop the same way (`pause_acting`) instead of failing the sequence: the heartbeat re-asserts the sessions and lets the
loop go on (services/common/worker.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Protocol, cast

import grpc
import torch
from redis.exceptions import RedisError

from kvrelay import trace
from kvrelay.internal.v1 import decode_pb2
from kvrelay.sampling import SamplingParams
from kvrelay.v1 import common_pb2
from kvstore.allocator import OutOfBlocks
from kvstore.block_table import blocks_needed
from kvstore.sessions import PoolNotInitialized, PoolRecovering, SessionError, SessionState, StoreUnavailable
from services.common.attach import Attached
from services.common.convert import FINISH, logprob_to_proto
from services.common.worker import LEASE_MS, OwnStream, sync_device
from services.model.sampler import PendingSample, SampleOutput, Sampler, finish_reason
from services.scheduler import catching_up, keeps_batch, preemption_victim, to_retire
from services.split.controller import PauseCredit

log = logging.getLogger("kvrelay.decode")
RETRY_RELEASE_S = 1.0  # how often a session whose free failed is tried again
FENCED_POLL_S = 0.05  # while the worker may not act (no heartbeat lately), it looks again this often


@dataclass(eq=False)
class RunningSeq:
    session_id: str
    params: SamplingParams
    history: list[int]  # prompt + generated; the last token is not in the pool yet
    num_cached: int  # tokens whose K/V are in the pool (below len(history) - 1 while a resumed sequence catches up)
    num_generated: int
    block_table: list[int]
    generator: torch.Generator | None
    out: asyncio.Queue = field(default_factory=asyncio.Queue)
    received: float = field(default_factory=time.perf_counter)
    first_sent: bool = False
    cancelled: bool = False
    finished: bool = False  # out of the batch; its blocks may still wait for a queued step (Step.ending)
    keep_session: bool = False  # multi-turn: release the KV as IDLE at the end instead of freeing it
    aborted: bool = False  # Abort always frees
    lost: bool = False  # another worker took the session over: drop it, touching nothing in Redis
    solo: bool = False  # was in a step that failed: runs alone once, so that only a sequence that fails alone fails
    request_id: str = ""  # the request it serves (re-asserted with the session after Redis lost its state)


@dataclass(frozen=True)
class Failed:
    """Put on a sequence's queue instead of a message: its Decode call ends with this status (the others go on)."""

    code: grpc.StatusCode
    details: str


# A session another worker took over while this one was cut off: its stream ends with this, touching nothing in Redis
LOST = Failed(grpc.StatusCode.UNAVAILABLE, "the session was taken over by another worker while this one was cut off")


@dataclass(eq=False)
class Step:
    """A decode step queued on the device whose sampled ids the host has not read yet."""

    batch: list[RunningSeq]
    pending: PendingSample | None = None
    # Sequences that ended while this step was queued. It still writes K/V into their blocks, so they are freed (or
    # released) once it completes; a kept session's final message (not None here) waits with them.
    ending: list[tuple[RunningSeq, decode_pb2.DecodeResponse | None]] = field(default_factory=list)


class DecodeStore(Protocol):
    """The session-store calls the step loop makes (kvstore/sessions.py's SessionStore; the tests' in-memory store).

    allocate appends n blocks to a session the caller owns and returns them, all or nothing (OutOfBlocks takes none;
    create=False: SessionError when the session was reclaimed or taken over meanwhile).
    """

    async def allocate(
        self, session_id: str, n: int, owner: str, lease_ms: int, /, *, create: bool, have: int | None = None
    ) -> list[int]: ...

    async def update(
        self, session_id: str, owner: str, state: SessionState | None, /, *, num_tokens: int, tokens: list[int]
    ) -> object: ...

    async def release(self, session_id: str, owner: str, /) -> None: ...

    async def free(self, session_id: str, /, owner: str | None = None) -> int: ...


class StepLoopHost(Protocol):
    """What StepLoop needs of the worker it is mixed into (DecodeWorker sets these once attached)."""

    attached: Attached  # runner, config.eos_token_ids, max_model_len, pool.geometry.block_size
    gpu: OwnStream  # runs a launch on the worker's stream, one at a time (shared with prefill when colocated)
    store: DecodeStore
    worker_id: str  # the owner in Redis of every session in the batch
    sampler: Sampler

    def may_act(self) -> bool: ...  # False: no step may start (services/common/worker.py, ACT_S)

    def pause_acting(self) -> None: ...  # no step until the next heartbeat that reaches Redis

    async def store_lost(self) -> bool: ...  # whether Redis lost its state since this worker's sessions were known


class ItlWindow:
    """The gaps between consecutive steps' tokens over the last WINDOW_S, while the batch ran without a break; with
    steps slower than the window, the running batch's last gap or the one in progress."""

    WINDOW_S = 1.0

    def __init__(self) -> None:
        self.gaps: deque[tuple[float, float]] = deque()  # (when, gap in ms)
        self.last: float | None = None  # when the running batch's last step ended; None: no batch runs
        self.last_gap: float | None = None  # the running batch's last gap (ms); None: none yet

    def step_done(self, now: float, running: bool) -> float | None:
        """Note a step's tokens out at `now`; returns the gap since the step before (None after a break)."""
        gap = None
        if self.last is not None:
            gap = (now - self.last) * 1e3
            self.gaps.append((now, gap))
        self.last = now if running else None  # an empty batch's wait for work is no inter-token gap
        self.last_gap = gap if running else None
        return gap

    def idle(self) -> None:
        """The batch is empty (its last sequences ended between steps): no gap is in progress until the next one."""
        self.last = self.last_gap = None

    def _recent(self, now: float) -> list[float]:
        while self.gaps and self.gaps[0][0] < now - self.WINDOW_S:
            self.gaps.popleft()
        in_progress = None if self.last is None else (now - self.last) * 1e3
        if self.gaps or in_progress is None or in_progress < self.WINDOW_S * 1e3:
            return [g for _, g in self.gaps]
        # The batch runs but no step ended in the window (steps slower than WINDOW_S: a CPU under load). Its ITL is
        # then its last gap, or the gap in progress once that is longer; not None, which reads as an idle decode and
        # would let the admission's overload check pass while decode is at its slowest.
        return [max(in_progress, self.last_gap or 0.0)]

    def mean_ms(self, now: float) -> float | None:
        recent = self._recent(now)
        return sum(recent) / len(recent) if recent else None

    def p90_ms(self, now: float) -> float | None:
        ordered = sorted(self._recent(now))
        return ordered[min(len(ordered) - 1, int(0.9 * len(ordered)))] if ordered else None


class StepLoop:
    """The batch and its loop, mixed into a StepLoopHost (DecodeWorker)."""

    @property
    def _host(self) -> StepLoopHost:
        # A mixin cannot name its host's attributes as its own; this view types them. It is `self`, nothing else.
        return cast(StepLoopHost, self)

    def init_steps(self, overlap: bool) -> None:
        self.running: list[RunningSeq] = []
        self.wakeup = asyncio.Event()
        self.inflight: Step | None = None
        self.overlap = overlap
        # sessions whose free (or release) failed, by id: retried every RETRY_RELEASE_S until Redis takes it (this
        # worker still owns them and renews their leases, so nobody else would ever free them)
        self.unreleased: dict[str, RunningSeq] = {}
        self.released_retry_at = 0.0
        # The split (services/split): the gaps between steps' tokens lately (what the controller protects); the
        # slack decode may spend pausing for prefill passes (None: the split is off); the passes running now, by
        # prefill worker, until when they are expected to end (monotonic), and an event set when none runs.
        self.itl = ItlWindow()
        self.credit: PauseCredit | None = None
        self.prefill_passes: dict[str, float] = {}
        self.no_prefill_pass = asyncio.Event()
        self.no_prefill_pass.set()

    async def step_loop(self) -> None:
        while True:
            if not self.running and self.inflight is None:
                self.itl.idle()  # the wait for work is no inter-token gap
                self.wakeup.clear()
                if self.unreleased:
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(self.wakeup.wait(), RETRY_RELEASE_S)
                else:
                    await self.wakeup.wait()
            if self.unreleased and time.perf_counter() >= self.released_retry_at:
                await self._retry_releases()
            queued = self.inflight.batch if self.inflight is not None else []
            for seq in to_retire(self.running, queued):
                await self._retire(seq)
            if self.inflight is None:
                await self._pause_for_prefill()
                await self._start_from_host()
            else:
                await self._advance()
            await asyncio.sleep(0)  # let new streams join and cancellations land between steps

    async def _start_from_host(self) -> None:
        """Queue a step over every sequence that can grow, with input ids from the host (nothing is in flight)."""
        if not self._host.may_act():
            await asyncio.sleep(FENCED_POLL_S)
            return
        batch, paused = [], []
        self._mark_new(self.running, "dc_loop")
        # A sequence of a step that failed runs alone first: if it fails again, it fails alone.
        solo = next((seq for seq in self.running if seq.solo and not seq.cancelled), None)
        for seq in [solo] if solo is not None else list(self.running):
            grown = await self._grow(seq)
            if seq.cancelled:
                continue  # failed (or taken over) while growing: retired at the next turn of the loop
            (batch if grown else paused).append(seq)
        if solo is not None and not batch:
            solo.solo = False  # no block for it now: it waits with the others
            return
        if not self._host.may_act():
            return  # Redis away or recovering (a _grow paused the loop): blocks are not short, nobody is preempted
        if paused and not batch:
            # Nobody can grow, so nobody will free blocks: give up the newest sequence (its blocks free others).
            victim = preemption_victim(paused)
            victim.out.put_nowait(grpc.StatusCode.RESOURCE_EXHAUSTED)
            await self._retire(victim)
        # Other paused sequences wait for blocks that finishing sequences return.
        if not batch:
            return
        step = Step(batch)
        wait = not self.overlap or solo is not None
        try:
            step.pending, out = await asyncio.to_thread(self._device_step, batch, None, None, wait)
            if not wait:
                self.inflight = step
            else:
                await self._finish(step, out, None)
                if solo is not None:
                    solo.solo = False
        except Exception:
            log.exception("decode step failed")
            await self._fail([step])

    async def _advance(self) -> None:
        """Step n is in flight: queue step n+1 on its device ids if the batch stays the same, then finish step n."""
        step = self.inflight
        nxt = Step(list(step.batch)) if await self._can_follow(step) else None
        try:
            pending, out = await asyncio.to_thread(
                self._device_step, nxt.batch if nxt else None, step.pending if nxt else None, step.pending
            )
            if nxt is not None:
                nxt.pending = pending
            self.inflight = nxt
            await self._finish(step, out, nxt)
        except Exception:
            log.exception("decode step failed")
            self.inflight = None
            await self._fail([step, nxt])

    async def _can_follow(self, step: Step) -> bool:
        """Whether the step after `step` runs the same sequences in the same order; grows their blocks one token
        ahead (the next step writes at num_cached + 1)."""
        if not self.overlap or not keeps_batch(step.batch, self.running, self._host.attached.max_model_len):
            return False
        if self._pause_ms() > 0:
            return False  # a step queued behind this one would leave the GPU no gap: pause first (step_loop)
        if not self._host.may_act():
            return False
        for seq in step.batch:
            if not await self._grow(seq, ahead=1):
                return False
        return True

    def _device_step(
        self, batch: list[RunningSeq] | None, prev: PendingSample | None, wait: PendingSample | None, wait_own=False
    ) -> tuple[PendingSample | None, SampleOutput | None]:
        """In a worker thread: queue a step for `batch` (input ids: `prev`'s on the device, else the host's), then
        wait for `wait`'s sampled ids (or, with wait_own, for the step just queued)."""
        pending = self._host.gpu.run(self._launch, batch, prev) if batch else None
        wait = pending if wait_own else wait
        return pending, (wait.result() if wait is not None else None)

    def _launch(self, batch: list[RunningSeq], prev: PendingSample | None) -> PendingSample:
        # With prev, the host has not seen the tokens of the step before: every position is one further.
        # From the host: the first token without K/V (the last one, unless the sequence is catching up).
        ahead = 0 if prev is None else 1
        tokens = prev.token_ids if prev is not None else [s.history[s.num_cached] for s in batch]
        self._mark_new(batch, "dc_launch")
        positions = [s.num_cached + ahead for s in batch]
        logits = self._host.attached.runner.decode(tokens, positions, [s.block_table for s in batch])
        pending = self._host.sampler.launch(
            logits,
            [s.params for s in batch],
            [s.generator for s in batch],
            [s.history for s in batch],
            [p + 1 for p in positions],  # where the sampled token goes: a seeded draw is a function of it
        )
        self._mark_new(batch, "dc_queued")
        return pending

    @staticmethod
    def _mark_new(batch: list[RunningSeq], event: str) -> None:
        """Hand-off trace (KVRELAY_TRACE_HANDOFF=1): marks for sequences whose first token is not out yet."""
        if trace.ENABLED:
            for seq in batch:
                if not seq.first_sent:
                    trace.mark(seq.session_id, event)

    async def _finish(self, step: Step, out: SampleOutput, nxt: Step | None) -> None:
        """Stream the tokens of a completed step. `nxt`, when queued, still writes into the blocks of the sequences
        in it: those that end here are retired when it completes."""
        ending, step.ending = step.ending, []  # taken first, so that a failure below never retires them twice
        done_at = time.perf_counter()
        for seq, msg in ending:  # `step` has completed: the blocks it wrote into can go
            await self._release(seq)
            if msg is not None:
                seq.out.put_nowait(msg)
        self._mark_new(step.batch, "dc_read")
        queued = nxt.batch if nxt is not None else []
        eos = self._host.attached.config.eos_token_ids
        limit = self._host.attached.max_model_len
        for row, seq in enumerate(step.batch):
            if seq.finished:
                continue  # ended at the step before; this row was computed for nothing
            if seq.cancelled:
                await self._end(seq, nxt if seq in queued else None, None)
                continue
            if catching_up(seq):
                seq.num_cached += 1  # the step wrote a token the gateway had streamed; its sample is not needed
                continue
            token = out.token_ids[row]
            seq.num_cached += 1
            seq.num_generated += 1
            seq.history.append(token)
            reason = finish_reason(token, seq.num_generated, seq.params, eos, len(seq.history) >= limit)
            msg = decode_pb2.DecodeResponse(token_ids=[token], finish=FINISH[reason])
            lp = logprob_to_proto(out, row)
            if lp is not None:
                msg.logprobs.append(lp)
            if not seq.first_sent:
                msg.first_step_ms = (time.perf_counter() - seq.received) * 1e3
                seq.first_sent = True
            if reason is None:
                seq.out.put_nowait(msg)
            else:
                await self._end(seq, nxt if seq in queued else None, msg)
        gap = self.itl.step_done(done_at, bool(self.running))
        if gap is not None and self.credit is not None:
            self.credit.step(gap)

    def prefill_pass(self, worker: str, expected_ms: float | None) -> None:
        """A prefill worker announced a pass starting (expected to take expected_ms) or, with None, ending."""
        if expected_ms is None:
            self.prefill_passes.pop(worker, None)
        else:
            self.prefill_passes[worker] = time.monotonic() + expected_ms / 1e3
        if not self.prefill_passes:
            self.no_prefill_pass.set()
        else:
            self.no_prefill_pass.clear()

    def _pause_ms(self) -> float:
        """How long to pause before the next step for a prefill pass running now (0: step now)."""
        if self.credit is None or not self.prefill_passes or not self.running:
            return 0.0
        now = time.monotonic()
        for worker in [w for w, end in self.prefill_passes.items() if end <= now]:
            self.prefill_pass(worker, None)  # its end was lost or it overran: stop waiting for it
        remaining = max((end - now for end in self.prefill_passes.values()), default=0.0)
        return self.credit.pause_ms(remaining * 1e3)

    async def _pause_for_prefill(self) -> None:
        """While decode has slack, let a running prefill pass have the GPU alone (services/split PauseCredit)."""
        pause = self._pause_ms()
        if pause > 0:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.no_prefill_pass.wait(), pause / 1e3)

    async def _end(self, seq: RunningSeq, nxt: Step | None, msg: decode_pb2.DecodeResponse | None) -> None:
        """Take `seq` out of the batch and send its final message; its blocks go now, or after `nxt` completes."""
        self.running.remove(seq)
        seq.finished = True
        if nxt is None:
            # blocks freed (or the session released for its next turn) before the client hears it finished,
            # so a next turn that follows at once finds the session IDLE
            await self._release(seq)
        elif seq.keep_session and not seq.aborted:
            nxt.ending.append((seq, msg))  # the same order: released first, then told
            return
        else:
            nxt.ending.append((seq, None))
        if msg is not None:
            seq.out.put_nowait(msg)

    async def _fail(self, steps: list[Step | None]) -> None:
        """A step raised. One sequence's input may be what broke it, so the sequences of a step of several are not
        failed: each runs its next step alone (`solo`), and one that fails alone fails. Freed blocks are freed once
        the device is idle. (The step's K/V writes are rewritten identically; a seeded sampled sequence draws anew.)"""
        with contextlib.suppress(Exception):
            await asyncio.to_thread(self._host.gpu.run, sync_device, self._host.attached.runner.device)
        live: list[RunningSeq] = []
        for step in steps:
            if step is None:
                continue
            ending, step.ending = step.ending, []
            for seq, msg in ending:
                await self._release(seq)
                if msg is not None:
                    seq.out.put_nowait(msg)
            live += [seq for seq in step.batch if not seq.finished and seq not in live]
        for seq in live:
            if len(live) > 1 and not seq.cancelled:
                seq.solo = True
                continue
            if not seq.cancelled:
                seq.out.put_nowait(decode_pb2.DecodeResponse(finish=common_pb2.FINISH_REASON_ERROR))
            await self._retire(seq)

    def _fail_alone(self, seq: RunningSeq, exc: Exception) -> None:
        """Something failed for this sequence only (a Redis call for its session): it ends with a status, its
        neighbours go on. The loop retires it like a cancelled one (its blocks freed once no queued step writes into
        them)."""
        if isinstance(exc, RedisError):
            code, what = grpc.StatusCode.UNAVAILABLE, "Redis is unavailable"
            log.warning("session %s failed: %s: %s", seq.session_id, type(exc).__name__, exc)
        else:
            code, what = grpc.StatusCode.INTERNAL, "decode failed"
            log.error("session %s failed", seq.session_id, exc_info=exc)
        if not seq.cancelled:
            seq.out.put_nowait(Failed(code, f"{what} for session {seq.session_id}: {type(exc).__name__}: {exc}"))
        seq.cancelled = seq.aborted = True  # freed, never kept: what its blocks hold is not known
        self.wakeup.set()

    async def _retry_releases(self) -> None:
        self.released_retry_at = time.perf_counter() + RETRY_RELEASE_S
        for sid, seq in list(self.unreleased.items()):
            del self.unreleased[sid]
            await self._release(seq)  # back in unreleased if it fails again

    async def _retire(self, seq: RunningSeq) -> None:
        """Out of the batch, blocks freed or released now (no queued step holds it)."""
        self.running.remove(seq)
        seq.finished = True
        await self._release(seq)

    async def _release(self, seq: RunningSeq) -> None:
        host = self._host
        if seq.lost:
            return  # another worker owns the session now
        try:
            if seq.keep_session and not seq.aborted:
                # the blocks hold K/V for history[:num_cached]: the next turn reuses that prefix
                tokens = seq.history[: seq.num_cached]
                await host.store.update(seq.session_id, host.worker_id, None, num_tokens=seq.num_cached, tokens=tokens)
                await host.store.release(seq.session_id, host.worker_id)
            else:
                await host.store.free(seq.session_id, owner=host.worker_id)
            self.unreleased.pop(seq.session_id, None)
        except SessionError:
            log.warning("session %s was taken over before it could be freed", seq.session_id)
            self.unreleased.pop(seq.session_id, None)
        except Exception as exc:  # Redis: this sequence's problem only; retried (see init_steps)
            if seq.session_id not in self.unreleased:
                log.warning("could not free session %s (%s: %s); retrying", seq.session_id, type(exc).__name__, exc)
            self.unreleased[seq.session_id] = seq

    async def _grow(self, seq: RunningSeq, ahead: int = 0) -> bool:
        """Blocks for the token the next step writes (`ahead` steps further); False when the pool is exhausted."""
        host = self._host
        need = blocks_needed(seq.num_cached + 1 + ahead, host.attached.pool.geometry.block_size) - len(seq.block_table)
        if need <= 0:
            return True
        try:
            have = len(seq.block_table)  # makes the call harmless to repeat (the store retries it)
            seq.block_table += await host.store.allocate(
                seq.session_id, need, host.worker_id, LEASE_MS, create=False, have=have
            )
            return True
        except OutOfBlocks:
            return False
        except (PoolRecovering, PoolNotInitialized, StoreUnavailable):
            # Redis away, or recovering from lost state: every sequence waits for the heartbeat that re-asserts
            # the sessions (or ends them, services/common/worker.py STORE_WAIT_S)
            host.pause_acting()
            return False
        except SessionError:
            if await host.store_lost():  # the record went with Redis' state; the re-assert brings it back
                return False
            self.lose(seq)  # taken over (or reclaimed) while this worker was cut off: not ours to touch
            return False
        except Exception as exc:  # Redis failed for this call: this sequence fails, not the batch
            self._fail_alone(seq, exc)
            return False

    def lose(self, seq: RunningSeq) -> None:
        """The session is no longer this worker's: leave it out of every step, and end its stream."""
        if seq.lost or seq.finished:
            return
        log.warning("session %s was taken over by another worker; dropping it", seq.session_id)
        seq.lost = seq.cancelled = True
        seq.out.put_nowait(LOST)
        self.wakeup.set()

"""One request's failure never touches another's: the real PrefillWorker and DecodeWorker, on the CPU with scripted
models and in-memory session stores that fail for one session (a Redis error, a forward pass that raises whenever
one prompt is in it). The failing request ends alone, with a real status; its neighbours in the same batch finish as
if it had not been there, and every block comes back. Also: Abort ends the aborted call with CANCELLED (prefill.proto,
decode.proto), and the workers check the ids and token ids they receive (INVALID_ARGUMENT)."""

from __future__ import annotations

import asyncio
from types import SimpleNamespace

import grpc
import pytest
import redis.exceptions
import torch

from kvrelay.internal.v1 import decode_pb2, prefill_pb2
from kvrelay.sampling import SamplingParams, params_to_proto
from kvrelay.settings import PrefillSettings
from kvrelay.v1 import common_pb2
from kvstore.allocator import OutOfBlocks
from kvstore.sessions import SessionRecord, SessionState
from services.common.worker import OwnStream
from services.decode.step_loop import Failed
from services.prefill.server import PrefillWorker
from tests.services.test_decode_overlap import (
    BLOCK_SIZE,
    NUM_BLOCKS,
    REQUESTS,
    STOP,
    VOCAB,
    Harness,
    MemoryStore,
    ScriptedRunner,
    expected,
    greedy,
    script,
)


class Aborted(Exception):
    """What the fake context's abort raises (grpc.aio raises its own AbortError)."""

    def __init__(self, code: grpc.StatusCode, details: str) -> None:
        super().__init__(f"{code.name}: {details}")
        self.code, self.details = code, details


class Context:
    def __init__(self) -> None:
        self.sent: list = []

    async def write(self, message) -> None:
        self.sent.append(message)

    async def abort(self, code: grpc.StatusCode, details: str):
        raise Aborted(code, details)


def redis_down() -> Exception:
    return redis.exceptions.ConnectionError("Error 111 connecting to 127.0.0.1:6379. Connection refused.")


# --- decode ------------------------------------------------------------------------------------------------------


class FlakyDecodeStore(MemoryStore):
    """Growing session `grow_fails` fails (Redis down for that call); freeing `free_fails` fails the first time."""

    def __init__(self, log: list, grow_fails: str = "", free_fails: str = "") -> None:
        super().__init__(log)
        self.grow_fails, self.free_fails = grow_fails, free_fails
        self.free_attempts: dict[str, int] = {}

    async def allocate(self, sid, n, owner, lease_ms, create=True, have=None) -> list[int]:
        if sid == self.grow_fails and sid in self.tables:
            raise redis_down()
        return await super().allocate(sid, n, owner, lease_ms, create)

    async def free(self, sid, owner=None) -> int:
        self.free_attempts[sid] = self.free_attempts.get(sid, 0) + 1
        if sid == self.free_fails and self.free_attempts[sid] == 1:
            raise redis_down()
        return await super().free(sid, owner)

    async def adopt(self, sid, owner, lease_ms, *, extra_tokens=0, **guards) -> SessionRecord:
        """A PREFILLED session of PROMPT_LEN tokens, handed over with the block its first step writes into."""
        prompt, _ = PENDING[sid]
        table = await super().allocate(sid, -(-(len(prompt) + extra_tokens) // BLOCK_SIZE), owner, lease_ms)
        return SessionRecord(sid, SessionState.DECODING, owner, len(prompt), None, "r", 0, 0, 1, tuple(table))


class PoisonedRunner(ScriptedRunner):
    """Every decode step that holds the poisoned session's row raises (the session's first block identifies it)."""

    def __init__(self, log: list, store: MemoryStore, poisoned: str) -> None:
        super().__init__(log)
        self.store, self.poisoned = store, poisoned

    def decode(self, token_ids, num_cached, block_tables) -> torch.Tensor:
        table = self.store.tables.get(self.poisoned)
        if table and any(t and t[0] == table[0] for t in block_tables):
            self.calls += 1
            raise RuntimeError(f"scripted failure of {self.poisoned}'s row")
        return super().decode(token_ids, num_cached, block_tables)


async def collect(seq) -> tuple[list[int], object]:
    """A stream's tokens and how it ended: a finish reason, a StatusCode or a Failed."""
    tokens = []
    while True:
        msg = await seq.out.get()
        if isinstance(msg, (grpc.StatusCode, Failed)):
            return tokens, msg
        tokens.extend(msg.token_ids)
        if msg.finish != common_pb2.FINISH_REASON_UNSPECIFIED:
            return tokens, msg.finish


async def run_decode(h: Harness) -> dict:
    loop = asyncio.create_task(h.worker.step_loop())
    seqs = {sid: await h.join(sid, p, f, greedy(m, st)) for sid, p, f, m, st in REQUESTS}
    results = dict(zip(seqs, await asyncio.wait_for(asyncio.gather(*map(collect, seqs.values())), 60), strict=True))
    for _ in range(500):  # settled: nothing runs, and every free that failed was retried
        if not h.worker.running and h.worker.inflight is None and not h.worker.unreleased:
            break
        await asyncio.sleep(0.01)
    loop.cancel()
    return results


@pytest.mark.parametrize("overlap", [True, False], ids=["overlap", "no-overlap"])
def test_a_redis_failure_for_one_sequence_fails_it_alone(overlap, monkeypatch):
    monkeypatch.setattr("services.decode.step_loop.RETRY_RELEASE_S", 0.05)
    h = Harness(overlap)
    h.store = h.worker.store = FlakyDecodeStore(h.log, grow_fails="c", free_fails="d")
    results = asyncio.run(run_decode(h))
    tokens, end = results.pop("c")
    assert isinstance(end, Failed) and end.code == grpc.StatusCode.UNAVAILABLE and "session c" in end.details
    assert tokens == expected()["c"][0][: len(tokens)]
    want = expected()
    del want["c"]
    assert results == want  # "d" too: its free failed once, after its client heard the end, and was retried
    assert h.store.free_attempts["d"] == 2
    h.check_blocks()


@pytest.mark.parametrize("overlap", [True, False], ids=["overlap", "no-overlap"])
def test_a_sequence_whose_steps_always_fail_fails_alone(overlap):
    h = Harness(overlap)
    h.runner = PoisonedRunner(h.log, h.store, poisoned="b")
    h.worker.sampler.runner = h.runner
    h.worker.attached.runner = h.runner
    results = asyncio.run(run_decode(h))
    tokens, end = results.pop("b")
    assert end == common_pb2.FINISH_REASON_ERROR and tokens == []
    want = expected()
    del want["b"]
    assert results == want
    h.check_blocks()


PENDING: dict[str, tuple[list[int], int]] = {sid: (prompt, first) for sid, prompt, first, *_ in REQUESTS}


def decode_request(sid: str, **kwargs) -> decode_pb2.DecodeRequest:
    prompt, first = PENDING[sid]
    fields = dict(
        session_id=sid,
        request_id="r",
        sampling=params_to_proto(greedy(30, ())),
        token_ids=[*prompt, first],
        num_generated=1,
    )
    return decode_pb2.DecodeRequest(**(fields | kwargs))


def decode_harness(overlap: bool = True) -> Harness:
    h = Harness(overlap)
    h.store = h.worker.store = FlakyDecodeStore(h.log)
    h.worker.attached.config.vocab_size = VOCAB
    return h


@pytest.mark.parametrize("overlap", [True, False], ids=["overlap", "no-overlap"])
def test_abort_ends_the_decode_stream_with_cancelled_and_frees_its_blocks(overlap):
    async def main():
        h = decode_harness(overlap)
        loop = asyncio.create_task(h.worker.step_loop())
        aborted, other = Context(), Context()
        a = decode_request("a", sampling=params_to_proto(greedy(30, (STOP,))))
        calls = [
            asyncio.create_task(h.worker.Decode(decode_request("e"), aborted)),
            asyncio.create_task(h.worker.Decode(a, other)),
        ]
        while len(aborted.sent) < 3:
            await asyncio.sleep(0.001)
        reply = await h.worker.Abort(common_pb2.AbortRequest(session_id="e", reason="test"), Context())
        assert reply.found
        with pytest.raises(Aborted) as err:
            await asyncio.wait_for(calls[0], 5)  # before the fix: silent until its deadline
        assert err.value.code == grpc.StatusCode.CANCELLED and "session e aborted: test" in err.value.details
        await asyncio.wait_for(calls[1], 30)  # the other stream goes on to its end
        assert [t for m in other.sent for t in m.token_ids] == expected()["a"][0]
        for _ in range(500):
            if not h.worker.running and h.worker.inflight is None:
                break
            await asyncio.sleep(0.01)
        loop.cancel()
        h.check_blocks()
        assert not (await h.worker.Abort(common_pb2.AbortRequest(session_id="e"), Context())).found  # idempotent

    asyncio.run(main())


@pytest.mark.parametrize(
    "request_kwargs, words",
    [
        ({"session_id": ""}, "session_id must not be empty"),
        ({"session_id": " e"}, "session_id"),
        ({"session_id": "e:blocks"}, "session_id"),
        ({"request_id": "r\n"}, "request_id"),
        ({"token_ids": []}, "token_ids must not be empty"),
        ({"token_ids": [1, VOCAB]}, "token_ids outside the vocabulary"),
        ({"sampling": params_to_proto(SamplingParams(max_tokens=4, stop_token_ids=(VOCAB + 3,)))}, "stop_token_ids"),
        ({"num_generated": 30}, "num_generated"),
        ({"num_generated": -1}, "num_generated"),
    ],
)
def test_decode_checks_what_it_receives(request_kwargs, words):
    async def main():
        h = decode_harness()
        with pytest.raises(Aborted) as err:
            await h.worker.Decode(decode_request("e", **request_kwargs), Context())
        assert err.value.code == grpc.StatusCode.INVALID_ARGUMENT and words in err.value.details
        assert h.store.tables == {}  # refused before adopting anything

    asyncio.run(main())


def test_abort_needs_a_session_id():
    async def main():
        for worker in (decode_harness().worker, prefill_harness()[0]):
            with pytest.raises(Aborted) as err:
                await worker.Abort(common_pb2.AbortRequest(session_id=""), Context())
            assert err.value.code == grpc.StatusCode.INVALID_ARGUMENT

    asyncio.run(main())


# --- prefill -----------------------------------------------------------------------------------------------------

POISON = 13  # a prompt holding this token makes every forward pass it is in raise


class PrefillStore(MemoryStore):
    """The calls the prefill worker makes; `alloc_fails` / `update_fails` raise a Redis error for one session;
    `no_blocks` are refused blocks (OutOfBlocks) for as long as they are in it."""

    def __init__(self, alloc_fails: str = "", update_fails: str = "") -> None:
        super().__init__([])
        self.alloc_fails, self.update_fails = alloc_fails, update_fails
        self.no_blocks: set[str] = set()
        self.states: dict[str, SessionState] = {}

    async def get(self, sid):
        return None

    async def allocate(self, sid, n, owner, lease_ms, create=True, request_id=None, have=None) -> list[int]:
        if sid == self.alloc_fails:
            raise redis_down()
        if sid in self.no_blocks:
            raise OutOfBlocks(n, 0)
        self.states[sid] = SessionState.PREFILLING
        return await super().allocate(sid, n, owner, lease_ms, create)

    async def update(self, sid, owner, state, lease_ms=None, **fields) -> bool:
        if sid == self.update_fails:
            raise redis_down()
        self.states[sid] = state
        return False

    async def free(self, sid, owner=None) -> int:
        self.states.pop(sid, None)
        return await super().free(sid, owner)


class PrefillRunner:
    """ModelRunner.forward over `script` (each sequence's last new token at its position); raises on POISON."""

    device = torch.device("cpu")

    def __init__(self) -> None:
        self.passes: list[int] = []  # sequences per forward pass

    def forward(self, chunks) -> torch.Tensor:
        self.passes.append(len(chunks))
        if any(POISON in c.token_ids for c in chunks):
            raise RuntimeError("scripted forward failure")
        return torch.stack([script(c.token_ids[-1], c.num_cached + len(c.token_ids) - 1) for c in chunks])


def prefill_harness(store: PrefillStore | None = None) -> tuple[PrefillWorker, PrefillStore, PrefillRunner]:
    w = PrefillWorker(
        PrefillSettings(worker_id="prefill-test", host="127.0.0.1", port=1, max_batch_tokens=64, block_wait_s=30)
    )
    store = store or PrefillStore()
    runner = PrefillRunner()
    w.store, w.gpu = store, OwnStream(torch.device("cpu"))
    w.attached = SimpleNamespace(
        runner=runner,
        config=SimpleNamespace(eos_token_ids=(2,), vocab_size=VOCAB),
        max_model_len=64,
        pool=SimpleNamespace(geometry=SimpleNamespace(block_size=BLOCK_SIZE, num_blocks=NUM_BLOCKS)),
    )
    return w, store, runner


PROMPTS = {"p0": [10, 20, 30], "p1": [11, 21, 31, 41], "p2": [12, 22], "p3": [14, 24, 34, 44, 54]}


def prefill_request(sid: str, prompt: list[int], **kwargs) -> prefill_pb2.PrefillRequest:
    fields = dict(session_id=sid, request_id="r", token_ids=prompt, sampling=params_to_proto(greedy(8, ())))
    return prefill_pb2.PrefillRequest(**(fields | kwargs))


async def prefill_all(w: PrefillWorker, prompts: dict[str, list[int]]) -> dict[str, object]:
    """Every prompt submitted at once (so they share forward passes); a reply or the status it was aborted with."""

    async def one(sid, prompt):
        try:
            return await w.Prefill(prefill_request(sid, prompt), Context())
        except Aborted as exc:
            return exc

    calls = [asyncio.create_task(one(sid, p)) for sid, p in prompts.items()]
    await asyncio.sleep(0)  # every call queued before the loop's first pass
    loop = asyncio.create_task(w.batch_loop())
    try:
        results = await asyncio.wait_for(asyncio.gather(*calls), 30)
    finally:
        loop.cancel()
    return dict(zip(prompts, results, strict=True))


def first_token(prompt: list[int]) -> int:
    return int(script(prompt[-1], len(prompt) - 1).argmax())


@pytest.mark.parametrize(
    "bad, store, code",
    [
        ("alloc", PrefillStore(alloc_fails="bad"), grpc.StatusCode.UNAVAILABLE),  # its blocks: Redis failed
        ("update", PrefillStore(update_fails="bad"), grpc.StatusCode.UNAVAILABLE),  # its hand-off: Redis failed
        ("forward", PrefillStore(), grpc.StatusCode.INTERNAL),  # every forward pass with it in raises
    ],
)
def test_a_prompt_that_fails_in_a_batch_fails_alone(bad, store, code):
    w, store, runner = prefill_harness(store)
    prompts = dict(PROMPTS) | {"bad": [POISON, 5, 6] if bad == "forward" else [15, 25, 35]}
    results = asyncio.run(prefill_all(w, prompts))
    failed = results.pop("bad")
    assert isinstance(failed, Aborted) and failed.code == code, failed
    for sid, reply in results.items():
        assert isinstance(reply, prefill_pb2.PrefillResponse), (sid, reply)
        assert reply.first_token_id == first_token(PROMPTS[sid]) and reply.num_tokens == len(PROMPTS[sid])
        assert store.states[sid] is SessionState.PREFILLED
    assert "bad" not in store.tables and "bad" not in store.states  # nothing of it left
    if bad == "forward":
        assert runner.passes[0] == len(prompts) and max(runner.passes[1:]) == 1  # then one prompt a pass
    assert w.ready == [] and w.waiting == []


def test_abort_ends_the_prefill_call_with_cancelled_queued_or_not():
    async def main():
        w, store, _ = prefill_harness()
        store.no_blocks.add("waits")  # queued: no blocks yet
        loop = asyncio.create_task(w.batch_loop())
        waiting = asyncio.create_task(w.Prefill(prefill_request("waits", [1, 2, 3]), Context()))
        await asyncio.sleep(0.2)
        assert not waiting.done() and w.waiting
        assert (await w.Abort(common_pb2.AbortRequest(session_id="waits"), Context())).found
        with pytest.raises(Aborted) as err:
            await asyncio.wait_for(waiting, 5)  # before the fix: silent until block_wait_s, then RESOURCE_EXHAUSTED
        assert err.value.code == grpc.StatusCode.CANCELLED and "waits" in err.value.details
        # aborted while it has its blocks (between the hand-over of its request and its forward pass)
        w.wakeup.clear()
        loop.cancel()
        ready = asyncio.create_task(w.Prefill(prefill_request("ready", [1, 2, 3]), Context()))
        await asyncio.sleep(0)
        await w._admit()
        assert store.tables["ready"]
        assert (await w.Abort(common_pb2.AbortRequest(session_id="ready"), Context())).found
        with pytest.raises(Aborted) as err:
            await asyncio.wait_for(ready, 5)
        assert err.value.code == grpc.StatusCode.CANCELLED
        await w._step(64)  # the loop's next turn frees its blocks and computes nothing
        assert store.tables == {} and sorted(store.free_blocks) == list(range(NUM_BLOCKS))
        assert not (await w.Abort(common_pb2.AbortRequest(session_id="ready"), Context())).found

    asyncio.run(main())


@pytest.mark.parametrize(
    "request_kwargs, words",
    [
        ({"session_id": " x"}, "session_id"),
        ({"session_id": ""}, "session_id must not be empty"),
        ({"request_id": "a:b"}, "request_id"),
        ({"token_ids": []}, "token_ids must not be empty"),
        ({"token_ids": [1, VOCAB + 1]}, "token_ids outside the vocabulary"),
        ({"sampling": params_to_proto(SamplingParams(max_tokens=4, stop_token_ids=(VOCAB,)))}, "stop_token_ids"),
    ],
)
def test_prefill_checks_what_it_receives(request_kwargs, words):
    async def main():
        w, store, _ = prefill_harness()
        with pytest.raises(Aborted) as err:
            await w.Prefill(prefill_request("x", [1, 2, 3], **request_kwargs), Context())
        assert err.value.code == grpc.StatusCode.INVALID_ARGUMENT and words in err.value.details
        assert w.waiting == []

    asyncio.run(main())

"""The decode worker's overlapped step loop, driven directly: a real DecodeWorker, Sampler and step loop on the CPU,
with a scripted model (logits from a seeded function of token and position) and an in-memory session store.

Checked: the streamed tokens equal a plain simulation and the loop without overlap, whatever joins, ends (EOS, stop
token, max_tokens, context), is cancelled or fails mid-batch (each sequence then retried alone); no block is freed
before every queued step that writes into it has completed; every block comes back; a kept session records exactly
the tokens its blocks hold and is released before its client hears the end; seeded sampling draws the same tokens
with and without overlap.
"""

from __future__ import annotations

import asyncio
import time
from types import SimpleNamespace

import grpc
import pytest
import torch

from kvrelay.internal.v1 import decode_pb2
from kvrelay.sampling import SamplingParams, params_to_proto
from kvrelay.settings import DecodeSettings
from kvrelay.v1 import common_pb2
from kvstore.allocator import OutOfBlocks
from kvstore.block_table import blocks_needed
from kvstore.sessions import SessionRecord, SessionState
from services.common.worker import OwnStream, sync_device
from services.decode.server import DecodeWorker
from services.model.cuda_graphs import HostInputs, InputLayout
from services.model.engine import Engine, EngineConfig
from services.model.runner import SeqChunk
from services.model.sampler import Sampler, finish_reason

VOCAB = 64
EOS = 2
STOP = 5
BLOCK_SIZE = 4  # small: sequences grow a block every few steps
NUM_BLOCKS = 96
MAX_LEN = 64


def script(token: int, position: int) -> torch.Tensor:
    """The scripted model: logits [VOCAB] for `token` at `position` (noisy, so sampling means something)."""
    logits = torch.randn(VOCAB, generator=torch.Generator().manual_seed(token * 4099 + position))
    logits[(3 * token + position) % VOCAB] += 2.5
    return logits


def reference(prompt: list[int], first: int, params: SamplingParams) -> tuple[list[int], str]:
    """Greedy tokens after prefill's first token, one at a time, with the finish rules of the decode worker."""
    history, out = [*prompt, first], []
    while True:
        token = int(script(history[-1], len(history) - 1).argmax())
        history.append(token)
        out.append(token)
        reason = finish_reason(token, len(out) + 1, params, (EOS,), len(history) >= MAX_LEN)
        if reason is not None:
            return out, reason


class ScriptedRunner:
    """ModelRunner.decode over `script`; logs each launch with the blocks it writes into."""

    device = torch.device("cpu")

    def __init__(self, log: list, fail_at: int | None = None, on_device_input=None) -> None:
        self.log, self.fail_at, self.on_device_input = log, fail_at, on_device_input
        self.calls = self.rows = self.device_inputs = 0

    def decode(self, token_ids, num_cached, block_tables) -> torch.Tensor:
        k = self.calls
        self.calls += 1
        if k == self.fail_at:
            raise RuntimeError("scripted step failure")
        if isinstance(token_ids, torch.Tensor):
            self.device_inputs += 1
            if self.on_device_input is not None:
                self.on_device_input(self.device_inputs)
            token_ids = token_ids.tolist()
        self.rows += len(token_ids)
        written = {table[p // BLOCK_SIZE] for p, table in zip(num_cached, block_tables, strict=True)}
        self.log.append(("launch", k, written))
        return torch.stack([script(t, p) for t, p in zip(token_ids, num_cached, strict=True)])


class LoggingSampler(Sampler):
    """Logs when the host has read a step's tokens: on the CPU, that is when the step has completed."""

    def __init__(self, runner: ScriptedRunner, log: list) -> None:
        self.runner, self.log = runner, log

    def launch(self, *args):
        pending, k = super().launch(*args), self.runner.calls - 1
        result = pending.result

        def logged():
            out = result()
            self.log.append(("done", k))
            return out

        pending.result = logged
        return pending


class MemoryStore:
    """The SessionStore calls the decode worker makes, in memory."""

    def __init__(self, log: list) -> None:
        self.log = log
        self.free_blocks = list(range(NUM_BLOCKS))
        self.tables: dict[str, list[int]] = {}
        self.kept: dict[str, tuple[int, list[int]]] = {}

    async def allocate(self, sid, n, owner, lease_ms, create=True, have=None) -> list[int]:
        if n > len(self.free_blocks):
            raise OutOfBlocks(n, len(self.free_blocks))
        blocks, self.free_blocks = self.free_blocks[:n], self.free_blocks[n:]
        self.tables.setdefault(sid, []).extend(blocks)
        return blocks

    async def free(self, sid, owner=None) -> int:
        blocks = self.tables.pop(sid, [])
        self.free_blocks += blocks
        self.log.append(("free", sid, set(blocks)))
        return len(blocks)

    async def update(self, sid, owner, state, num_tokens=None, tokens=None) -> None:
        self.kept[sid] = (num_tokens, list(tokens))

    async def release(self, sid, owner) -> None:
        self.log.append(("release", sid, set(self.tables[sid])))


class LoggingStream(OwnStream):
    """Logs a device sync (the step loop's error path waits for the device before freeing)."""

    def __init__(self, log: list) -> None:
        super().__init__(torch.device("cpu"))
        self.log = log

    def run(self, fn, *args):
        out = super().run(fn, *args)
        if fn is sync_device:
            self.log.append(("sync",))
        return out


class Harness:
    def __init__(self, overlap: bool, **runner_kwargs) -> None:
        self.log: list = []
        self.seqs: dict = {}
        self.store = MemoryStore(self.log)
        self.runner = ScriptedRunner(self.log, **runner_kwargs)
        args = DecodeSettings(worker_id="decode-test", host="127.0.0.1", port=1, overlap=overlap)
        w = self.worker = DecodeWorker(args)
        w.store, w.gpu, w.sampler = self.store, LoggingStream(self.log), LoggingSampler(self.runner, self.log)
        w.attached = SimpleNamespace(
            runner=self.runner,
            config=SimpleNamespace(eos_token_ids=(EOS,)),
            max_model_len=MAX_LEN,
            pool=SimpleNamespace(geometry=SimpleNamespace(block_size=BLOCK_SIZE)),
        )

    async def join(self, sid: str, prompt: list[int], first: int, params: SamplingParams, keep: bool = False):
        """What Decode does once prefill handed the session over: the prompt's K/V is in the pool."""
        table = await self.store.allocate(sid, blocks_needed(len(prompt) + 1, BLOCK_SIZE), "decode-test", 1)
        record = SessionRecord(
            sid, SessionState.DECODING, "decode-test", len(prompt), first, "r", 0, 0, 1, tuple(table)
        )
        request = decode_pb2.DecodeRequest(session_id=sid, keep_session=keep, sampling=params_to_proto(params))
        self.seqs[sid] = self.worker._join(request, params, [*prompt, first], 1, record, time.perf_counter())
        return self.seqs[sid]

    async def collect(self, seq, cancel_after: int | None = None) -> tuple[list[int], int]:
        """The client's side of a stream: tokens and the finish reason (logged as 'told')."""
        tokens = []
        while True:
            msg = await seq.out.get()
            if isinstance(msg, grpc.StatusCode):
                return tokens, msg
            tokens.extend(msg.token_ids)
            if msg.finish != common_pb2.FINISH_REASON_UNSPECIFIED:
                self.log.append(("told", seq.session_id))
                return tokens, msg.finish
            if cancel_after is not None and len(tokens) == cancel_after:
                seq.cancelled = True  # what Decode's finally does when the client goes away
                self.worker.wakeup.set()

    async def settle(self) -> None:
        """Until nothing runs and nothing is in flight: every retirement is done."""
        for _ in range(1000):
            if not self.worker.running and self.worker.inflight is None:
                return
            await asyncio.sleep(0.01)
        raise AssertionError("the step loop did not settle")

    def check_blocks(self) -> None:
        """Every block is back, and none was freed while a step that writes into it was still queued."""
        assert sorted(self.store.free_blocks) == list(range(NUM_BLOCKS)) and self.store.tables == {}
        done: set[int] = set()
        for i, event in enumerate(self.log):
            if event[0] == "done":
                done.add(event[1])
            elif event[0] == "sync":
                done |= {e[1] for e in self.log[:i] if e[0] == "launch"}
            elif event[0] in ("free", "release"):
                for launch in self.log[:i]:
                    if launch[0] == "launch" and launch[2] & event[2]:
                        assert launch[1] in done, f"{event[0]} of {event[1]} before step {launch[1]} completed"


REQUESTS = [  # (session, prompt, first token, max_tokens, stop token ids): EOS, stop token, length and context ends
    ("a", [10, 20, 30], 40, 30, (STOP,)),
    ("b", [11, 21, 31], 41, 30, (STOP,)),
    ("c", [12, 22, 32], 42, 30, (STOP,)),
    ("d", [14, 24, 34], 44, 12, ()),
    ("e", [17, 27, 37], 47, 30, ()),
    ("f", list(range(100, 150)), 45, 40, ()),  # reaches the context (MAX_LEN) first
    ("g", [19, 29, 39], 59, 3, ()),
]


def greedy(max_tokens: int, stop: tuple[int, ...]) -> SamplingParams:
    return SamplingParams(temperature=0.0, max_tokens=max_tokens, stop_token_ids=stop)


async def run_requests(
    h: Harness, late: int = 2, cancel: str | None = None, cancel_after: int | None = None
) -> dict[str, tuple[list[int], int]]:
    """All requests at once except the last `late`, which join while the others run. The `cancel` stream is left
    out of the results (its client cancels after `cancel_after` tokens, or the test cancels it some other way)."""
    loop = asyncio.create_task(h.worker.step_loop())
    collectors = {}
    for i, (sid, prompt, first, max_tokens, stop) in enumerate(REQUESTS):
        if i == len(REQUESTS) - late:
            await asyncio.sleep(0.05)  # a few steps in
        seq = await h.join(sid, prompt, first, greedy(max_tokens, stop))
        collectors[sid] = asyncio.create_task(h.collect(seq, cancel_after if sid == cancel else None))
    if cancel is not None:
        await asyncio.sleep(0.5)
        collectors.pop(cancel).cancel()  # a cancelled stream never ends on its own
    results = dict(zip(collectors, await asyncio.wait_for(asyncio.gather(*collectors.values()), 60), strict=True))
    await h.settle()
    loop.cancel()
    return results


def expected() -> dict[str, tuple[list[int], int]]:
    out = {}
    for sid, prompt, first, max_tokens, stop in REQUESTS:
        tokens, reason = reference(prompt, first, greedy(max_tokens, stop))
        out[sid] = (tokens, {"stop": common_pb2.FINISH_REASON_STOP, "length": common_pb2.FINISH_REASON_LENGTH}[reason])
    return out


def test_the_requests_end_every_way():
    """Guards the scripted model: the requests above end by EOS, by a stop token, by max_tokens and by the context."""
    ends = {sid: tokens[-1] for sid, (tokens, _) in expected().items()}
    assert EOS in ends.values() and STOP in ends.values()
    assert any(r == common_pb2.FINISH_REASON_LENGTH for _, r in expected().values())
    f = REQUESTS[5]
    assert len(f[1]) + 1 + len(expected()["f"][0]) == MAX_LEN


@pytest.mark.parametrize("overlap", [True, False], ids=["overlap", "no-overlap"])
def test_streams_equal_the_reference(overlap):
    h = Harness(overlap)
    assert asyncio.run(run_requests(h)) == expected()
    h.check_blocks()
    rows = sum(len(tokens) for tokens, _ in expected().values())
    if overlap:
        # steps were queued on device ids, and rows of sequences that had just ended were computed and ignored
        assert h.runner.device_inputs > 0 and h.runner.rows > rows
    else:
        assert h.runner.device_inputs == 0 and h.runner.rows == rows


def test_a_client_hears_its_end_before_the_queued_step_completes():
    """EOS at step n with step n+1 queued: the final message goes out at once, the blocks after step n+1."""
    h = Harness(overlap=True)
    asyncio.run(run_requests(h))
    told = {e[1]: i for i, e in enumerate(h.log) if e[0] == "told"}
    freed = {e[1]: i for i, e in enumerate(h.log) if e[0] == "free"}
    assert any(told[sid] < freed[sid] for sid in told)


@pytest.mark.parametrize("overlap", [True, False], ids=["overlap", "no-overlap"])
def test_a_kept_session_records_its_tokens_and_is_released_before_its_client_hears(overlap):
    sid, prompt, first, max_tokens, stop = REQUESTS[0]
    h = Harness(overlap)

    async def main():
        loop = asyncio.create_task(h.worker.step_loop())
        others = [await h.join(s, p, f, greedy(m, st)) for s, p, f, m, st in REQUESTS[1:4]]
        kept = await h.join(sid, prompt, first, greedy(max_tokens, stop), keep=True)
        results = await asyncio.gather(h.collect(kept), *(h.collect(s) for s in others))
        await h.settle()
        loop.cancel()
        return results[0]

    tokens, _ = asyncio.run(main())
    assert tokens == expected()[sid][0]
    history = [*prompt, first, *tokens]
    # the last token's K/V was never written (a discarded extra step may have written it: not counted)
    assert h.store.kept[sid] == (len(history) - 1, history[:-1])
    events = [e[0] for e in h.log if e[0] in ("release", "told") and e[1] == sid]
    assert events == ["release", "told"]
    # the kept session's blocks were handed back to the store's free-list only by this test's store; put them back
    h.store.free_blocks += h.store.tables.pop(sid)
    h.check_blocks()


def test_seeded_sampling_is_the_same_with_and_without_overlap():
    def params(i: int) -> SamplingParams:
        if i % 3 == 2:
            return greedy(20 + i, (STOP,))
        return SamplingParams(temperature=1.0, top_p=0.9, seed=1000 + i, max_tokens=20 + i, logprobs=2)

    async def main(overlap: bool):
        h = Harness(overlap)
        loop = asyncio.create_task(h.worker.step_loop())
        seqs = [await h.join(f"s{i}", [10 + i, 20 + i], 30 + i, params(i)) for i in range(6)]
        results = await asyncio.gather(*(h.collect(s) for s in seqs))
        await h.settle()
        loop.cancel()
        h.check_blocks()
        return results, h.runner.device_inputs

    (with_overlap, device_inputs), (without, _) = asyncio.run(main(True)), asyncio.run(main(False))
    assert with_overlap == without and device_inputs > 0


def test_a_repetition_penalty_row_turns_overlap_off():
    async def main(overlap: bool):
        h = Harness(overlap)
        loop = asyncio.create_task(h.worker.step_loop())
        p = SamplingParams(temperature=0.0, max_tokens=12, repetition_penalty=1.3)
        seqs = [await h.join("p", [10, 20, 30], 40, p), await h.join("q", [11, 21, 31], 41, greedy(12, ()))]
        results = await asyncio.gather(*(h.collect(s) for s in seqs))
        await h.settle()
        loop.cancel()
        return results, h.runner.device_inputs

    (with_overlap, device_inputs), (without, _) = asyncio.run(main(True)), asyncio.run(main(False))
    assert with_overlap == without and device_inputs == 0


@pytest.mark.parametrize("when", ["between-steps", "while-queued"])
def test_a_cancelled_stream_is_freed_once_no_queued_step_writes_into_it(when):
    cancelled = "b"
    h = Harness(overlap=True)
    if when == "while-queued":
        # The cancel lands while the worker thread queues step n+1, before the loop reads step n: the cancelled
        # sequence is in a queued step when the loop sees it, and must wait for that step.
        def cancel_now(n: int) -> None:
            if n == 4:
                h.seqs[cancelled].cancelled = True

        h.runner.on_device_input = cancel_now
    results = asyncio.run(
        run_requests(h, late=0, cancel=cancelled, cancel_after=5 if when == "between-steps" else None)
    )
    want = expected()
    del want[cancelled]
    assert results == want
    assert h.seqs[cancelled].finished and len(h.seqs[cancelled].history) < 3 + 1 + len(expected()[cancelled][0])
    h.check_blocks()


@pytest.mark.parametrize("overlap", [True, False], ids=["overlap", "no-overlap"])
def test_a_step_that_fails_once_fails_nobody_and_frees_every_block(overlap):
    """The step's sequences run their next step one at a time (a sequence that fails alone fails alone:
    tests/services/test_isolation.py); a failure that does not come back fails none of them."""
    h = Harness(overlap, fail_at=6)
    assert asyncio.run(run_requests(h, late=0)) == expected()
    h.check_blocks()


def test_runner_decode_takes_host_or_device_ids_and_equals_forward(default_model_dir):
    engine = Engine(EngineConfig(model_dir=default_model_dir, dtype="float32", num_blocks=8), progress=False)
    engine.generate([[1, 2]], SamplingParams(max_tokens=1))  # builds the pool and the runner
    runner, tables = engine.runner, [(0, 1), (2, 3)]
    runner.forward([SeqChunk((1, 2, 3, 4, 5), 0, tables[0]), SeqChunk((6, 7, 8), 0, tables[1])])  # two prompts
    want = runner.forward([SeqChunk((9,), 5, tables[0]), SeqChunk((10,), 3, tables[1])])
    assert torch.equal(runner.decode([9, 10], [5, 3], tables), want)
    assert torch.equal(runner.decode(torch.tensor([9, 10]), [5, 3], tables), want)
    with pytest.raises(ValueError, match="past it"):
        runner.decode([9], [32], [tables[0]])


def test_graph_inputs_travel_in_one_copy():
    """The CUDA-graph input packing (host mirror -> one device buffer), with a CPU tensor standing in for the GPU."""
    layout = InputLayout(8, 5)
    host = HostInputs(layout, pin=False)
    device = torch.zeros(layout.nbytes, dtype=torch.uint8)
    ids, positions, slots, lens, tables = layout.views(device)
    assert all((v.data_ptr() - device.data_ptr()) % 256 == 0 for v in (ids, positions, slots, lens, tables))

    def step(token_ids, pos, slot, block_tables) -> None:
        start, end = host.write(token_ids, pos, slot, block_tables)
        device[start:end].copy_(host.buffer[start:end])

    step([7, 8, 9], [4, 9, 0], [11, 22, 33], [[1, 2], [3, 4, 5], [6]])
    assert ids[:3].tolist() == [7, 8, 9] and positions[:3].tolist() == [4, 9, 0]
    assert slots.tolist() == [11, 22, 33] + [-1] * 5 and lens.tolist() == [5, 10, 1] + [1] * 5
    assert tables[:3, :3].tolist() == [[1, 2, 0], [3, 4, 5], [6, 0, 0]]
    ids[:2] = torch.tensor([70, 80])  # ids from the device: the previous step's copy, not the host's
    step(None, [5, 10], [12, 23], [[1, 2], [3, 4, 5]])
    assert ids[:3].tolist() == [70, 80, 9] and lens[:3].tolist() == [6, 11, 1] and slots[:3].tolist() == [12, 23, -1]

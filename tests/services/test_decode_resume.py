"""A decode worker resuming a session whose worker died: it catches up the tokens the dead worker had streamed but not
recorded (one step each, sample thrown away) and then streams what an uninterrupted run would have, greedy or
seeded. Driven directly, like test_decode_overlap.py, with a scripted model whose logits read the whole pool: a
position whose K/V is missing or wrong changes every later token."""

from __future__ import annotations

import asyncio
import time

import pytest
import torch

from kvrelay.internal.v1 import decode_pb2
from kvrelay.sampling import SamplingParams, params_to_proto
from kvstore.block_table import blocks_needed
from kvstore.sessions import SessionRecord, SessionState
from tests.services.test_decode_overlap import BLOCK_SIZE, Harness, ScriptedRunner, script

PROMPT = [10, 20, 30, 11, 21]
FIRST = 40


class PoolRunner(ScriptedRunner):
    """Writes each input token into a shared pool (block, slot) -> token, and mixes every token read back from the
    pool below the position into the logits, as attention would."""

    def __init__(self, log: list, pool: dict) -> None:
        super().__init__(log)
        self.pool = pool

    def decode(self, token_ids, num_cached, block_tables) -> torch.Tensor:
        ids = token_ids.tolist() if isinstance(token_ids, torch.Tensor) else list(token_ids)
        rows = []
        for token, p, table in zip(ids, num_cached, block_tables, strict=True):
            self.pool[(table[p // BLOCK_SIZE], p % BLOCK_SIZE)] = token
            context = [self.pool.get((table[i // BLOCK_SIZE], i % BLOCK_SIZE), -1) for i in range(p)]
            mix = sum((i + 1) * (t + 7) for i, t in enumerate(context)) % 9973
            rows.append(script(token, p) + 1.5 * script(mix, 1))
        self.calls += 1
        self.log.append(("launch", self.calls - 1, set()))
        return torch.stack(rows)


def harness(pool: dict, overlap: bool) -> Harness:
    h = Harness(overlap)
    h.runner = PoolRunner(h.log, pool)
    h.worker.attached.runner = h.runner
    h.worker.sampler.runner = h.runner
    return h


async def stream(h: Harness, table: list[int], history: list[int], num_cached: int, params, stop_after=None):
    """Join the session as Decode does (adopted record with `num_cached` tokens) and collect its stream."""
    record = SessionRecord("s", SessionState.DECODING, "decode-test", num_cached, None, "r", 0, 0, 1, tuple(table))
    request = decode_pb2.DecodeRequest(session_id="s", sampling=params_to_proto(params))
    num_generated = len(history) - len(PROMPT)
    seq = h.worker._join(request, params, list(history), num_generated, record, time.perf_counter())
    loop = asyncio.create_task(h.worker.step_loop())
    tokens = []
    while True:
        msg = await asyncio.wait_for(seq.out.get(), 30)
        tokens.extend(msg.token_ids)
        if msg.finish or (stop_after is not None and len(tokens) >= stop_after):
            break
    loop.cancel()  # stop_after: the worker "dies" here, leaving whatever it wrote in the pool
    with pytest.raises(asyncio.CancelledError):
        await loop
    return tokens


PARAMS = {
    "greedy": SamplingParams(temperature=0.0, max_tokens=30),
    "seeded": SamplingParams(temperature=1.0, top_p=0.95, seed=77, max_tokens=30),
}


@pytest.mark.parametrize("overlap", [True, False], ids=["overlap", "no-overlap"])
@pytest.mark.parametrize("kind", list(PARAMS))
@pytest.mark.parametrize("recorded", ["prompt", "some", "all"])
def test_a_resumed_stream_equals_an_uninterrupted_one(kind, recorded, overlap):
    params = PARAMS[kind]
    table = list(range(blocks_needed(len(PROMPT) + params.max_tokens + 2, BLOCK_SIZE)))

    def prefilled() -> dict:
        return {(table[i // BLOCK_SIZE], i % BLOCK_SIZE): t for i, t in enumerate(PROMPT)}

    whole = asyncio.run(stream(harness(prefilled(), overlap), table, [*PROMPT, FIRST], len(PROMPT), params))
    assert len(whole) == params.max_tokens - 1

    for died_after in (1, 7, 20):
        pool = prefilled()
        seen = asyncio.run(
            stream(harness(pool, overlap), table, [*PROMPT, FIRST], len(PROMPT), params, stop_after=died_after)
        )
        assert seen == whole[: len(seen)]
        history = [*PROMPT, FIRST, *seen]
        # what the dead worker had recorded with its last heartbeat: nothing, a few steps, or everything it streamed
        cached = {"prompt": len(PROMPT), "some": len(PROMPT) + len(seen) // 2, "all": len(history) - 1}[recorded]
        # K/V the record does not vouch for is wiped: the resumed worker must write it again, and ignore the rest
        for i in range(cached, len(PROMPT) + params.max_tokens + 2):
            pool[(table[i // BLOCK_SIZE], i % BLOCK_SIZE)] = -5
        resumed = asyncio.run(stream(harness(pool, overlap), table, history, cached, params))
        assert seen + resumed == whole, (died_after, recorded)

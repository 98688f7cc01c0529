"""The scheduling policy (services/scheduler.py) against plainly written expectations, and its two prefill callers.

Packing: over successive passes, the queue's remaining prompt tokens, laid end to end in queue order, are cut into
consecutive windows of max_batch_tokens; each window is one forward pass, and each prompt's part of it one chunk.
`windows` below computes that token by token, independently of the packer's arithmetic. The offline engine and the
prefill worker, handed the same queue, cut the same chunks (and each chunk's block table covers it).
"""

from __future__ import annotations

import asyncio
import random
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

from kvrelay.sampling import SamplingParams
from kvstore.allocator import BlockAllocator
from kvstore.block_table import blocks_needed
from services.model.engine import prefill_batch as engine_prefill_batch
from services.prefill.server import PrefillJob
from services.prefill.server import prefill_batch as worker_prefill_batch
from services.scheduler import (
    MAX_WAITING,
    Admission,
    PrefillChunk,
    PromptProgress,
    fits_context,
    keeps_batch,
    pack_prefill,
    preemption_victim,
    queue_full,
    reusable_prefix,
    to_retire,
)

Pass = list[tuple[int, int, int, bool]]  # one forward pass: (prompt, start, end, completes the prompt) per chunk


def windows(queue: list[tuple[int, int]], budget: int) -> list[Pass]:
    """The expected passes for a queue of (num_tokens, cached) prompts: every remaining token as (prompt, position),
    in queue order, cut into windows of `budget` tokens; consecutive positions of one prompt in a window are a chunk."""
    stream = [(i, pos) for i, (num_tokens, cached) in enumerate(queue) for pos in range(cached, num_tokens)]
    passes = []
    for w in range(0, len(stream), budget):
        chunks: Pass = []
        for i, pos in stream[w : w + budget]:
            if chunks and chunks[-1][0] == i:
                chunks[-1] = (i, chunks[-1][1], pos + 1, pos + 1 == queue[i][0])
            else:
                chunks.append((i, pos, pos + 1, pos + 1 == queue[i][0]))
        passes.append(chunks)
    return passes


def packed(queue: list[tuple[int, int]], budget: int) -> list[Pass]:
    """pack_prefill pass after pass, with the bookkeeping both callers do: progress advances past each chunk, and
    completed prompts leave the queue, the others keeping their order."""
    progress = {i: cached for i, (_, cached) in enumerate(queue)}
    pending = list(progress)
    passes = []
    while pending:
        plan = pack_prefill([PromptProgress(queue[i][0], progress[i]) for i in pending], budget)
        passes.append([(pending[c.index], c.start, c.end, c.last) for c in plan])
        for c in plan:
            progress[pending[c.index]] = c.end
        pending = [i for i in pending if progress[i] < queue[i][0]]
    return passes


def random_queue(n: int, seed: int) -> list[tuple[int, int]]:
    rng = random.Random(seed)
    queue = []
    for _ in range(n):
        num_tokens = rng.randint(1, 300)
        queue.append((num_tokens, rng.choice([0, 0, rng.randrange(num_tokens)])))
    return queue


QUEUES = {
    "one token": [(1, 0)],
    "one odd prompt": [(37, 0)],
    "cached prefix": [(53, 17)],
    "prefix all but one": [(33, 32)],
    "short and long": [(5, 0), (300, 0), (3, 0), (129, 64), (1, 0)],
    "block-size multiples": [(16, 0), (32, 16), (48, 0)],
    "many prompts": random_queue(60, seed=1),
    "many with prefixes": random_queue(40, seed=2),
}
BUDGETS = [1, 2, 7, 16, 61, 256, 2048]


@pytest.mark.parametrize("budget", BUDGETS)
@pytest.mark.parametrize("name", list(QUEUES))
def test_passes_are_the_queue_cut_into_budget_windows(name, budget):
    queue = QUEUES[name]
    assert packed(queue, budget) == windows(queue, budget)


@pytest.mark.parametrize("budget", BUDGETS)
@pytest.mark.parametrize("name", list(QUEUES))
def test_one_pass_fills_the_budget_in_queue_order(name, budget):
    queue = QUEUES[name]
    plan = pack_prefill([PromptProgress(n, cached) for n, cached in queue], budget)
    assert [(c.index, c.start, c.end, c.last) for c in plan] == windows(queue, budget)[0]
    remaining = sum(n - cached for n, cached in queue)
    assert sum(c.num_tokens for c in plan) == min(budget, remaining)
    assert [c.index for c in plan] == list(range(len(plan)))  # a prefix of the queue, nobody skipped
    assert all(c.last for c in plan[:-1])  # only the pass's last chunk may stop short of its prompt's end


def test_a_long_prompt_is_chunked_over_its_cached_prefix():
    plan = pack_prefill([PromptProgress(100, 30)], 32)
    assert plan == [PrefillChunk(index=0, start=30, end=62, last=False)]
    assert packed([(100, 30)], 32) == [[(0, 30, 62, False)], [(0, 62, 94, False)], [(0, 94, 100, True)]]


@pytest.mark.parametrize(("prompt", "budget"), [(PromptProgress(5, 5), 8), (PromptProgress(5, 6), 8)])
def test_a_finished_prompt_in_the_queue_is_an_error(prompt, budget):
    with pytest.raises(ValueError, match="no tokens left"):
        pack_prefill([PromptProgress(3, 0), prompt], budget)


def test_the_budget_must_hold_a_token():
    with pytest.raises(ValueError, match="max_batch_tokens"):
        pack_prefill([PromptProgress(3, 0)], 0)


@pytest.mark.parametrize("budget", [1, 5, 16, 64, 2048])
@pytest.mark.parametrize("name", ["short and long", "cached prefix", "many with prefixes"])
def test_the_engine_and_the_prefill_worker_cut_the_same_chunks(name, budget):
    """Each caller's own packing step (its block tables and SeqChunks included), pass after pass, on one queue."""
    block_size = 16
    rng = random.Random(budget)
    queue = QUEUES[name]
    prompts = [[rng.randrange(1000) for _ in range(n)] for n, _ in queue]

    # The offline engine: blocks come as chunks need them; a cached prefix's blocks are already in the table.
    allocator = BlockAllocator(sum(blocks_needed(n, block_size) for n, _ in queue), shuffle_seed=0)
    progress = [cached for _, cached in queue]
    tables = [allocator.allocate(blocks_needed(cached, block_size)) for _, cached in queue]
    pending = list(range(len(queue)))
    engine_passes = []
    while pending:
        batch, chunks = engine_prefill_batch(prompts, progress, tables, pending, allocator, block_size, budget)
        engine_passes.append([(i, c.token_ids, c.num_cached) for i, c in zip(batch, chunks, strict=True)])
        for c in chunks:
            assert len(c.block_table) * block_size >= c.num_cached + len(c.token_ids)
        pending = [i for i in pending if progress[i] < len(prompts[i])]

    # The prefill worker: every block of the prompt allocated at admission; progress starts at the reused prefix.
    loop = asyncio.new_event_loop()
    try:
        ready = []
        for i, (prompt, (_, cached)) in enumerate(zip(prompts, queue, strict=True)):
            job = PrefillJob(f"s{i}", f"r{i}", prompt, SamplingParams(), loop.create_future())
            job.block_table = list(range(blocks_needed(len(prompt), block_size)))
            job.progress = job.cached = cached
            ready.append(job)
        jobs = list(ready)
        worker_passes = []
        while ready:
            batch, chunks = worker_prefill_batch(ready, budget)
            worker_passes.append(
                [(jobs.index(j), c.token_ids, c.num_cached) for j, c in zip(batch, chunks, strict=True)]
            )
            for c in chunks:
                assert len(c.block_table) * block_size >= c.num_cached + len(c.token_ids)
            ready = [j for j in ready if j.progress < len(j.token_ids)]
        assert all(j.started is not None for j in jobs)
    finally:
        loop.close()

    assert engine_passes == worker_passes
    expected = [[(i, tuple(prompts[i][s:e]), s) for i, s, e, _ in chunks] for chunks in windows(queue, budget)]
    assert engine_passes == expected
    assert progress == [len(p) for p in prompts]


# -- admission -------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("num_tokens", "max_model_len", "fits"),
    [(0, 8, False), (1, 8, True), (7, 8, True), (8, 8, False), (9, 8, False), (2047, 2048, True)],
)
def test_a_prompt_fits_when_it_leaves_room_for_one_token(num_tokens, max_model_len, fits):
    assert fits_context(num_tokens, max_model_len) is fits


def test_the_waiting_queue_is_bounded():
    assert not queue_full(0)
    assert not queue_full(MAX_WAITING - 1)
    assert queue_full(MAX_WAITING)


def test_admission_refuses_what_the_pool_can_never_hold_and_waits_a_bounded_time():
    policy = Admission(block_size=16, num_blocks=4, block_wait_s=2.0)
    assert [policy.blocks_for(n) for n in (1, 16, 17, 64, 65)] == [1, 1, 2, 4, 5]
    assert not policy.never_fits(policy.blocks_for(64))
    assert policy.never_fits(policy.blocks_for(65))
    assert policy.keeps_waiting(0.0) and policy.keeps_waiting(2.0)
    assert not policy.keeps_waiting(2.01)


@pytest.mark.parametrize(
    ("cached", "prompt", "reuse"),
    [
        ([], [1, 2, 3], 0),
        ([9, 2, 3], [1, 2, 3], 0),
        ([1, 2, 9, 4], [1, 2, 3, 4, 5], 2),
        ([1, 2, 3], [1, 2, 3, 4, 5], 3),
        ([1, 2, 3], [1, 2, 3], 2),  # the whole prompt is cached: its last token is computed again, for its logits
        ([1, 2, 3, 4, 5], [1, 2, 3], 2),
        ([7], [7], 0),
    ],
)
def test_the_reused_prefix_is_the_common_prefix_short_of_the_last_prompt_token(cached, prompt, reuse):
    assert reusable_prefix(cached, prompt) == reuse


# -- decode batch membership -----------------------------------------------------------------------------------------


def seq(name: str, *, generated=3, history=10, max_tokens=100, penalty=1.0, cancelled=False, received=0.0):
    return SimpleNamespace(
        name=name,
        params=SamplingParams(max_tokens=max_tokens, repetition_penalty=penalty),
        history=list(range(history)),
        num_cached=history - 1,
        num_generated=generated,
        cancelled=cancelled,
        received=received,
    )


MAX_LEN = 64


def test_the_same_batch_follows_when_nothing_changed():
    a, b = seq("a"), seq("b")
    assert keeps_batch([a, b], [a, b], MAX_LEN)
    # one token short of both limits: the step in flight does not end it
    c = seq("c", generated=8, max_tokens=10, history=MAX_LEN - 2)
    assert keeps_batch([c], [c], MAX_LEN)


@pytest.mark.parametrize(
    "change",
    ["joined", "left", "reordered", "replaced", "cancelled", "penalty", "max_tokens", "context", "catching_up"],
)
def test_the_batch_changes_when_a_sequence_joins_leaves_or_ends_by_length(change):
    a, b = seq("a"), seq("b")
    queued, running = [a, b], [a, b]
    if change == "joined":
        running = [a, b, seq("new")]
    elif change == "left":
        running = [a]
    elif change == "reordered":
        running = [b, a]
    elif change == "replaced":
        running = [a, seq("b")]  # another sequence with the same fields is still another sequence
    elif change == "cancelled":
        b.cancelled = True
    elif change == "penalty":
        b = seq("b", penalty=1.2)
        queued = running = [a, b]
    elif change == "max_tokens":
        b.num_generated = b.params.max_tokens - 1  # the token in flight is its last
    elif change == "context":
        b.history = list(range(MAX_LEN - 1))  # the token in flight fills the context
    elif change == "catching_up":
        b.num_cached -= 2  # resumed: its next input is a token its dead worker streamed, not the one in flight
    assert not keeps_batch(queued, running, MAX_LEN)


def test_cancelled_sequences_retire_unless_a_queued_step_writes_into_them():
    a, b, c, d = seq("a", cancelled=True), seq("b"), seq("c", cancelled=True), seq("d", cancelled=True)
    assert to_retire([a, b, c, d], queued=[b, c]) == [a, d]
    assert to_retire([a, b, c, d], queued=[]) == [a, c, d]


def test_the_newest_paused_sequence_is_given_up():
    old, newest, mid = seq("old", received=1.0), seq("newest", received=3.0), seq("mid", received=2.0)
    assert preemption_victim([old, newest, mid]) is newest


def test_the_policy_imports_no_torch_redis_or_grpc():
    code = "import sys, services.scheduler; print(sorted({'torch', 'redis', 'grpc'} & set(sys.modules)))"
    root = Path(__file__).resolve().parents[2]
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=root)
    assert out.stdout.strip() == "[]"

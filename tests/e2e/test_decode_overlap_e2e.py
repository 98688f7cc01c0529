"""The overlapped decode loop through real processes and a real Redis, against `kvrelay run` and against the same
deployment with `--no-decode-overlap`: concurrent requests that end at different steps (EOS, max_tokens, a stop
token), seeded sampling, a multi-turn session's recorded tokens, and every block back in the free-list."""

from __future__ import annotations

import asyncio
import uuid

import pytest

from kvrelay.client import AsyncClient, build_request
from kvrelay.deployment import REDIS_URL, Deployment
from kvstore.sessions import SessionStore
from tests.e2e.test_e2e import MAX_TOKENS, QUESTIONS, chat, kvrelay_run

PROMPTS = [*QUESTIONS, "Say hello."]  # the first three end at EOS within MAX_TOKENS, the last runs to it
GREEDY = [(0, MAX_TOKENS), (1, MAX_TOKENS), (2, MAX_TOKENS), (3, MAX_TOKENS), (2, 6), (3, 11), (0, 3), (3, 1)]
STOP_AFTER = 6  # request 2 stops at the token its greedy answer has here
TURNS = ["Name a fruit.", "What colour is it?"]


@pytest.fixture(scope="module")
def reference() -> list[list[int]]:
    return [r["token_ids"] for r in kvrelay_run(*[a for q in PROMPTS for a in ("--prompt", q)])]


async def workload(d: Deployment, stop_token: int) -> dict:
    """Everything a mode is checked on, from one deployment."""
    async with AsyncClient(d.address) as client:

        async def greedy(i: int, max_tokens: int) -> list[int]:
            return list((await client.complete(**chat(PROMPTS[i]) | {"max_tokens": max_tokens})).token_ids)

        async def stopped() -> list[int]:
            request = build_request(**chat(PROMPTS[2]))
            request.stop_token_ids.append(stop_token)
            return list((await client.stub.Complete(request)).token_ids)

        async def seeded(i: int) -> list[int]:
            out = await client.complete(**chat(PROMPTS[i]) | {"temperature": 0.8, "seed": 7 + i, "max_tokens": 16})
            return list(out.token_ids)

        out = {}
        out["greedy"] = await asyncio.gather(*(greedy(i, k) for i, k in GREEDY))
        out["stopped"], *out["seeded"] = await asyncio.gather(stopped(), *(seeded(i) for i in range(len(PROMPTS))))

        sid, messages, out["turns"], out["kept"] = f"ov-{uuid.uuid4().hex[:8]}", [], [], []
        async with SessionStore(REDIS_URL, d.name) as store:
            for text in TURNS:  # the next turn follows at once: the session must already be IDLE
                messages.append({"role": "user", "content": text})
                reply = await client.complete(messages=messages, max_tokens=16, temperature=0.0, session_id=sid)
                messages.append({"role": "assistant", "content": reply.text})
                record = await store.get(sid)
                out["turns"].append((list(reply.token_ids), reply.finish.cached_prompt_tokens))
                out["kept"].append((reply.finish, record.num_tokens, await store.get_tokens(sid)))
            await store.free(sid)  # what eviction would do; the pool must then be whole again
    return out


@pytest.fixture(scope="module")
def runs(reference) -> dict[str, dict]:
    stop_token = reference[2][STOP_AFTER]
    out = {}
    for mode, flags in (("overlap", ()), ("no-overlap", ("--no-decode-overlap",))):
        d = Deployment("--num-blocks", "96", "--max-batch-tokens", "64", "--max-model-len", "2048", *flags)
        try:
            out[mode] = asyncio.run(workload(d, stop_token))
            out[mode]["audit"] = d.audit()
        finally:
            assert d.stop() == 0, d.output()[-3000:]
        assert d.leftovers() == []
    return out


@pytest.mark.parametrize("mode", ["overlap", "no-overlap"])
def test_greedy_streams_equal_kvrelay_run(runs, reference, mode):
    assert all(len(r) < MAX_TOKENS and r[-1] == 2 for r in reference[:3])  # they end at EOS mid-batch
    for (i, max_tokens), tokens in zip(GREEDY, runs[mode]["greedy"], strict=True):
        assert tokens == reference[i][:max_tokens]
    stop_token = reference[2][STOP_AFTER]
    assert runs[mode]["stopped"] == reference[2][: reference[2].index(stop_token) + 1]


@pytest.mark.parametrize("mode", ["overlap", "no-overlap"])
def test_blocks_come_back_and_kept_sessions_hold_their_tokens(runs, mode):
    report, stats = runs[mode]["audit"]
    assert report.ok and stats.used == 0 and stats.active_sessions == 0, report.message
    for finish, num_tokens, tokens in runs[mode]["kept"]:
        # every token but the last generated one has its K/V in the pool
        assert num_tokens == finish.prompt_tokens + finish.completion_tokens - 1 == len(tokens)
    (first, _), (second, cached) = runs[mode]["turns"]
    assert tokens[len(tokens) - len(second) + 1 :] == second[:-1] and cached > 0


def test_overlap_changes_nothing(runs):
    overlap, plain = runs["overlap"], runs["no-overlap"]
    for key in ("greedy", "stopped", "seeded", "turns"):
        assert overlap[key] == plain[key], key

"""The colocated baseline (`kvrelay up --mode colocated`): one process prefills and decodes, same tokens as the rest."""

from __future__ import annotations

import asyncio

from kvrelay.client import AsyncClient, Client
from kvrelay.deployment import Deployment
from tests.e2e.test_e2e import MAX_TOKENS, QUESTIONS, chat, kvrelay_run


def test_colocated_mode_streams_the_same_tokens():
    runs = kvrelay_run(*[a for q in QUESTIONS for a in ("--prompt", q)])
    want = {q: r["token_ids"] for q, r in zip(QUESTIONS, runs, strict=True)}
    d = Deployment("--mode", "colocated", "--num-blocks", "96", "--max-batch-tokens", "32")
    try:
        with Client(d.address) as client:
            status = client.status()
            assert sorted(w.role for w in status.workers) == ["decode", "prefill"]
            assert len({w.address for w in status.workers}) == 1  # one process serves both roles

        async def main():  # concurrent streams: prefills (chunked at 32 tokens) interleave with decode steps
            async with AsyncClient(d.address) as client:
                outs = await asyncio.gather(*(client.complete(**chat(q)) for q in QUESTIONS * 2))
                return [(q, list(o.token_ids)) for q, o in zip(QUESTIONS * 2, outs, strict=True)]

        for q, tokens in asyncio.run(main()):
            assert tokens == want[q] and len(tokens) <= MAX_TOKENS
        report, stats = d.audit()
        assert report.ok and stats.used == 0, report.message
    finally:
        assert d.stop() == 0
    assert d.leftovers() == []

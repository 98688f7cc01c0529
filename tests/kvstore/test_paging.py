"""Paging is invisible: the same tokens whatever the block size or the order block ids are handed out in."""

from __future__ import annotations

import pytest

from kvrelay.sampling import SamplingParams
from kvrelay.tokenizer import Tokenizer
from services.model.engine import Engine, EngineConfig

QUESTIONS = ["Name the planets of the solar system.", "How do I boil an egg?", "Translate 'good morning' to French."]


@pytest.fixture(scope="module")
def prompts(default_model_dir) -> list[list[int]]:
    tok = Tokenizer.from_dir(default_model_dir)
    return [tok.encode_chat([{"role": "user", "content": q}]) for q in QUESTIONS]


@pytest.fixture(scope="module")
def reference(default_model_dir, prompts) -> list[list[int]]:
    engine = Engine(EngineConfig(model_dir=default_model_dir, dtype="float32", block_size=16), progress=False)
    return [
        r.token_ids for r in engine.generate(prompts, SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True))
    ]


@pytest.mark.parametrize("block_size, shuffle_seed", [(8, None), (32, None), (16, 7), (8, 123)])
def test_block_size_and_block_order_do_not_change_tokens(
    default_model_dir, prompts, reference, block_size, shuffle_seed
):
    cfg = EngineConfig(
        model_dir=default_model_dir,
        dtype="float32",
        block_size=block_size,
        block_shuffle_seed=shuffle_seed,
        num_blocks=64,  # more blocks than needed, so shuffled ids are spread over the whole pool
        max_batch_tokens=40,  # prompts are prefilled in chunks over their cached prefix too
    )
    engine = Engine(cfg, progress=False)
    results = engine.generate(prompts, SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True))
    assert [r.token_ids for r in results] == reference
    assert engine.allocator.num_used() == 0  # every block came back


def test_same_seed_same_sample(default_model_dir, prompts):
    engine = Engine(EngineConfig(model_dir=default_model_dir, dtype="float32"), progress=False)
    params = SamplingParams(temperature=0.9, top_p=0.95, seed=42, max_tokens=16, ignore_eos=True)
    alone = engine.generate(prompts[:1], params)[0].token_ids
    batched = engine.generate([prompts[1], prompts[0]], [SamplingParams(temperature=1.0, max_tokens=16), params])[1]
    assert batched.token_ids == alone

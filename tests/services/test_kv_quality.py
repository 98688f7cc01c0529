"""Quantized KV quality on 1k tokens of English, teacher-forced, against the unquantized (float32) run."""

from __future__ import annotations

import pytest

from kvrelay.tokenizer import Tokenizer
from services.model.kv_quality import measure


@pytest.fixture(scope="module")
def quality(default_model_dir, english_text):
    ids = Tokenizer.from_dir(default_model_dir).encode(english_text)[:1024]
    assert len(ids) == 1024
    ref_ppl, rows = measure(default_model_dir, ids, ["bf16", "int8", "k=int8,v=bf16", "fp8"])
    return ref_ppl, {r.kv_dtype: r for r in rows}


def test_bf16_kv_top1_agreement(quality):
    assert quality[1]["bf16"].top1_agreement >= 0.99


def test_int8_kv_top1_agreement(quality):
    assert quality[1]["int8"].top1_agreement >= 0.97
    assert quality[1]["k=int8,v=bf16"].top1_agreement >= 0.97


def test_int8_kv_perplexity_within_one_percent_of_bf16(quality):
    rows = quality[1]
    assert abs(rows["int8"].perplexity / rows["bf16"].perplexity - 1) <= 0.01


def test_bytes_per_token_shrink_with_quantization(quality):
    rows = quality[1]
    # SmolLM2: 30 layers x 3 kv heads x 64 dims x (K + V); int8 adds one float32 scale per token-head
    assert rows["bf16"].bytes_per_token == 30 * 3 * 64 * 2 * 2
    assert rows["int8"].bytes_per_token == 30 * 3 * (64 + 4) * 2
    assert rows["bf16"].bytes_per_token > rows["k=int8,v=bf16"].bytes_per_token > rows["int8"].bytes_per_token

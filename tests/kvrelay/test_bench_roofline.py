"""bench/roofline.py against figures worked out by hand for the Llama-3-8B shape, and the MoE shapes' totals
against their published sizes."""

from __future__ import annotations

import pytest

from bench.roofline import SHAPES, decode_ms, kv_bytes_per_token, params, prefill_ms, table


def test_dense_8b_by_hand():
    p = params(SHAPES["llama3-8b"])
    attention = 4096 * 4096 * 2 + 2 * 4096 * 1024  # q and o, k and v (8 KV heads of 128)
    ffn = 3 * 4096 * 14336
    assert p.attention == attention == 41_943_040 and p.expert == ffn == 176_160_768
    assert p.read(1) == p.read(64) == p.active == 32 * (attention + ffn) + 128256 * 4096 == 7_504_658_432
    assert p.total == 8_029_995_008  # 8.03 B, as published (norms, 266k, not counted)
    assert kv_bytes_per_token(SHAPES["llama3-8b"]) == 32 * 2 * 8 * (128 + 4) == 67_584
    by_hand = (7_504_658_432 * 2 + 1024 * 67_584) / 4.0e12 * 1e3  # 3.770 ms at 4.0 TB/s
    assert decode_ms(SHAPES["llama3-8b"], 1) == pytest.approx(by_hand) == pytest.approx(3.7696, abs=1e-4)
    flops = 2 * (7_504_658_432 - 525_336_576) * 2048 + 2 * 525_336_576 + 2 * 32 * 32 * 128 * 2048**2
    assert prefill_ms(SHAPES["llama3-8b"], 2048) == pytest.approx(flops / (0.6 * 1307e12) * 1e3)


@pytest.mark.parametrize(
    ("name", "total_b", "active_b"),
    [  # published sizes; active counts the embedding too, as the model cards do
        ("mixtral-8x7b", 46.7, 12.9),
        ("qwen1.5-moe-a2.7b", 14.3, 2.7),
        ("qwen2-57b-a14b", 57.4, 14.2),
        ("qwen3-30b-a3b", 30.5, 3.3),
        ("olmoe-1b-7b", 6.9, 1.3),
    ],
)
def test_moe_shapes_match_published_sizes(name, total_b, active_b):
    p = params(SHAPES[name])
    assert p.total / 1e9 == pytest.approx(total_b, abs=0.1)
    assert (p.active + p.embedding) / 1e9 == pytest.approx(active_b, abs=0.1)
    assert p.read(1) == p.active and p.read(64) <= p.total - p.embedding  # batch 1: top-k experts; never above all


def test_table_has_a_row_per_shape():
    assert len(table().splitlines()) == 2 + len(SHAPES)

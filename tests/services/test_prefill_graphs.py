"""services/model/prefill_graphs.py on the CPU: the padded inputs a prefill graph replays (a chunk padded to its token
bucket: token 0 at position 0, slot -1, outside cu_seqlens_q; the logits picked from row T - 1) run eagerly through
the reference kernels, against the runner's plain forward of the same chunk. On a GPU the same buffers are captured
(tests/services/test_gpu.py compares the replays with the eager path there)."""

from __future__ import annotations

import pytest
import torch

from kvrelay.sampling import SamplingParams
from kvstore.block_table import slot_mapping
from services.model.engine import Engine, EngineConfig
from services.model.prefill_graphs import PrefillGraphs
from services.model.runner import SeqChunk


@pytest.mark.parametrize("kv_dtype", ["fp32", "int8"])
def test_padded_prefill_chunks_equal_the_plain_forward(default_model_dir, kv_dtype):
    cfg = EngineConfig(model_dir=default_model_dir, dtype="float32", kv_dtype=kv_dtype, num_blocks=32)
    engine = Engine(cfg, progress=False)
    engine.generate([[1, 2, 3]], SamplingParams(max_tokens=1))  # builds the pool (fixed size) and the runner
    runner, pool = engine.runner, engine.runner.pool
    graphs = PrefillGraphs(runner.model, pool, 64, 512)
    assert graphs.buckets == [16, 32, 64] and graphs.bucket(17) == 32 and graphs.bucket(65) is None

    ids = torch.randint(100, 40000, (200,), generator=torch.Generator().manual_seed(4)).tolist()
    size = cfg.block_size
    table = tuple(range(3, 3 + -(-(100 + 64) // size)))  # not from block 0: a stray write to slot 0 would show
    runner.forward([SeqChunk(tuple(ids[:100]), 0, table)])  # the cached prefix
    for t in (1, 5, 16, 17, 40, 64):
        chunk = SeqChunk(tuple(ids[100 : 100 + t]), 100, table)
        want = runner.forward([chunk]).clone()
        written = [
            (pool.layer(i).k_cache.clone(), pool.layer(i).v_cache.clone()) for i in range(pool.geometry.num_layers)
        ]
        slots = slot_mapping(list(table), 100, 100 + t, size)
        got = graphs.replay(chunk.token_ids, 100, slots, chunk.block_table)
        assert got.shape == want.shape == (1, want.shape[-1])
        if kv_dtype == "fp32":
            torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
        else:
            # The padded pass recomputes the chunk's K/V with GEMMs of another shape (another summation order): a value
            # on an int8 rounding tie may round the other way, which moves the logits by up to ~1e-2 of their norm
            # (measured: 0.009 between one and two threads of the same plain forward). A padding bug moves them O(1).
            assert ((got - want).norm() / want.norm()).item() < 3e-2, t
            assert got.argmax() == want.argmax(), t
        # The padded pass wrote the chunk's K/V again (the same values but for summation order) and nothing else.
        chunk_rows = torch.tensor(slots)
        for i, (k_before, v_before) in enumerate(written):
            layer = pool.layer(i)
            for before, after in ((k_before, layer.k_cache), (v_before, layer.v_cache)):
                before, after = before.view(-1, *before.shape[2:]), after.view(-1, *after.shape[2:])
                others = torch.ones(before.shape[0], dtype=torch.bool)
                others[chunk_rows] = False
                assert torch.equal(before[others], after[others]), (t, i)
                if kv_dtype == "fp32":
                    torch.testing.assert_close(after[chunk_rows], before[chunk_rows], rtol=1e-4, atol=1e-4)
                else:  # int8: rounding ties, and in deep layers the hidden states the ties above moved (measured
                    # up to 0.012 of the norm; a wrong row written would be O(1))
                    b, a = before[chunk_rows].float(), after[chunk_rows].float()
                    assert ((a - b).norm() / b.norm()).item() < 5e-2, (t, i)

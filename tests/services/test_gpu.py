"""The GPU path (Triton kernels, CUDA graphs) against HF transformers and the CPU path. Skipped without a GPU.

The 8B-shape test needs a random checkpoint: `kvrelay make-checkpoint --preset llama3-8b --out DIR --device cuda`
and KVRELAY_8B_CHECKPOINT=DIR. A checkpoint made before make_checkpoint's well-conditioned init must be made again.
"""

from __future__ import annotations

import os

import pytest
import torch

from kvrelay.sampling import SamplingParams
from kvrelay.tokenizer import Tokenizer
from services.model.engine import Engine, EngineConfig

pytestmark = pytest.mark.gpu

QUESTIONS = ["What is the capital of France?", "Write a haiku about the sea.", "List three prime numbers."]


def _8b_refs(ckpt: str, ids: list[int]) -> dict:
    transformers = pytest.importorskip("transformers")
    refs = {}
    for dtype in (torch.bfloat16, torch.float32):
        hf = transformers.AutoModelForCausalLM.from_pretrained(ckpt, dtype=dtype).cuda().eval()
        with torch.no_grad():
            refs[dtype] = hf(torch.tensor([ids], device="cuda")).logits[0].float().cpu()
        del hf
        torch.cuda.empty_cache()
    return refs


def _ours(ckpt: str, ids: list[int], dtype: str) -> torch.Tensor:
    engine = Engine(EngineConfig(model_dir=ckpt, dtype=dtype, kv_dtype="auto"), progress=False)
    out = engine.score(ids).float().cpu()
    del engine
    torch.cuda.empty_cache()
    return out


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm()).item()


def test_8b_shape_logits_match_hf():
    """Random Llama-3-8B-shape weights, 512 random tokens, the Triton/GPU engine against HF transformers.

    fp32: our kernels compute what HF computes (2e-4 allows for TF32-free fp32 GEMMs summing in another order).
    bf16: the acceptance bound, 2e-2 against HF in bf16. It can hold only because make_checkpoint's init is
    conditioned like a trained network's (its docstring): with the former N(0, 0.02)-everywhere weights bf16 rounding
    alone moved HF's logits 7% from its own fp32 result (H200). With this init, same shape and tokens, on the CPU: HF
    bf16 vs fp32 0.0148, our torch-reference path in bf16 vs HF bf16 0.0127. And ours in bf16 is no further from the
    fp32 result than HF in bf16 is.
    """
    ckpt = os.environ.get("KVRELAY_8B_CHECKPOINT")
    if not ckpt:
        pytest.skip("set KVRELAY_8B_CHECKPOINT to a `make-checkpoint --preset llama3-8b` directory")
    ids = torch.randint(0, 128256, (512,), generator=torch.Generator().manual_seed(0)).tolist()
    ours16, ours32 = _ours(ckpt, ids, "bfloat16"), _ours(ckpt, ids, "float32")
    refs = _8b_refs(ckpt, ids)
    hf16, hf32 = refs[torch.bfloat16], refs[torch.float32]
    report = (
        f"ours-fp32 vs HF-fp32 {_rel(ours32, hf32):.2e}; ours-bf16 vs HF-bf16 {_rel(ours16, hf16):.4f}, "
        f"ours-bf16 vs HF-fp32 {_rel(ours16, hf32):.4f}, HF-bf16 vs HF-fp32 {_rel(hf16, hf32):.4f}"
    )
    print(report)
    assert _rel(ours32, hf32) < 2e-4, report
    assert _rel(ours16, hf16) < 2e-2, report
    assert _rel(ours16, hf32) <= 1.1 * _rel(hf16, hf32), report


def test_greedy_gpu_equals_cpu_on_default_model(default_model_dir):
    tok = Tokenizer.from_dir(default_model_dir)
    prompts = [tok.encode_chat([{"role": "user", "content": q}]) for q in QUESTIONS]
    params = SamplingParams(temperature=0.0, max_tokens=32, ignore_eos=True)
    cpu = Engine(EngineConfig(model_dir=default_model_dir, dtype="float32", device="cpu"), progress=False)
    gpu = Engine(EngineConfig(model_dir=default_model_dir, dtype="float32", device="cuda"), progress=False)
    want = [r.token_ids for r in cpu.generate(prompts, params)]
    assert [r.token_ids for r in gpu.generate(prompts, params)] == want
    gpu.runner.enable_cuda_graphs(8, 512)  # the decode worker's path: graphs per batch bucket
    assert [r.token_ids for r in gpu.generate(prompts, params)] == want


def test_int8_kv_quality_on_gpu(default_model_dir, english_text):
    from services.model.kv_quality import measure

    ids = Tokenizer.from_dir(default_model_dir).encode(english_text)[:1024]
    _, rows = measure(default_model_dir, ids, ["int8"], dtype="bfloat16", device="cuda")
    assert rows[0].top1_agreement >= 0.97, rows[0]


def test_bf16_decode_graphs_equal_eager_on_default_model(default_model_dir):
    """The serving path in bf16 (batch-1 Triton GEMV, kernels launched with programmatic dependent launch, replayed
    from CUDA graphs) produces the same greedy tokens as the same engine run eagerly, one kernel launch at a time."""
    tok = Tokenizer.from_dir(default_model_dir)
    prompts = [tok.encode_chat([{"role": "user", "content": q}]) for q in QUESTIONS]
    params = SamplingParams(temperature=0.0, max_tokens=48, ignore_eos=True)
    engine = Engine(EngineConfig(model_dir=default_model_dir, dtype="bfloat16", device="cuda"), progress=False)
    # one prompt at a time: batch 1, the GEMV path
    eager = [engine.generate([p], params)[0].token_ids for p in prompts]
    engine.runner.enable_cuda_graphs(8, 512)
    assert [engine.generate([p], params)[0].token_ids for p in prompts] == eager


def test_overlapped_decode_steps_equal_the_engine(default_model_dir):
    """The decode worker's overlap on the GPU: step k+1 is queued from step k's sampled ids on the device, from CUDA
    graphs, on a stream of its own, before the host reads step k's ids; the tokens equal the engine's greedy ones."""
    from services.model.runner import SeqChunk
    from services.model.sampler import Sampler

    tok = Tokenizer.from_dir(default_model_dir)
    prompts = [tok.encode_chat([{"role": "user", "content": q}]) for q in QUESTIONS]
    params = SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True, logprobs=1)
    cfg = EngineConfig(model_dir=default_model_dir, dtype="bfloat16", device="cuda", num_blocks=64)
    engine = Engine(cfg, progress=False)
    engine.generate([prompts[0]], SamplingParams(max_tokens=1))  # builds the pool (fixed size: kept) and the runner
    engine.runner.enable_cuda_graphs(8, 512)
    want = engine.generate(prompts, params)
    runner, sampler, n = engine.runner, Sampler(), len(prompts)
    blocks = -(-(max(map(len, prompts)) + params.max_tokens) // engine.cfg.block_size)
    tables = [tuple(range(i * blocks, (i + 1) * blocks)) for i in range(n)]
    first = runner.forward([SeqChunk(tuple(p), 0, t) for p, t in zip(prompts, tables, strict=True)]).argmax(-1)
    got = [[t] for t in first.tolist()]
    logprobs = [[] for _ in prompts]
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        cached = [len(p) for p in prompts]
        args = ([params] * n, [None] * n, [[]] * n)
        pending = sampler.launch(runner.decode(first.tolist(), cached, tables), *args)
        for step in range(1, params.max_tokens - 1):
            queued = sampler.launch(runner.decode(pending.token_ids, [c + step for c in cached], tables), *args)
            out = pending.result()  # step k's ids reach the host while step k+1 runs
            for row in range(n):
                got[row].append(out.token_ids[row])
                logprobs[row].append(out.logprobs[row])
            pending = queued
        out = pending.result()
        for row in range(n):
            got[row].append(out.token_ids[row])
            logprobs[row].append(out.logprobs[row])
    assert got == [r.token_ids for r in want]
    for row, r in enumerate(want):
        torch.testing.assert_close(logprobs[row], r.logprobs[1:], atol=1e-3, rtol=0)


@pytest.mark.parametrize("kv_dtype", ["auto", "int8"])
def test_prefill_graphs_equal_eager_on_default_model(default_model_dir, kv_dtype):
    """Short one-sequence prefill chunks replayed from CUDA graphs (padded to a token bucket) against the eager path,
    in float32 (in bf16 the padded GEMMs round differently from the eager ones, and a greedy run drifts apart after
    ~20 tokens on this model): the same greedy generations (the graphs write the prompt's K/V), and the same logits
    for chunks of 1..256 new tokens over a cached prefix, at the bucket edges."""
    from services.model.runner import SeqChunk

    tok = Tokenizer.from_dir(default_model_dir)
    prompts = [tok.encode_chat([{"role": "user", "content": q}]) for q in QUESTIONS]
    params = SamplingParams(temperature=0.0, max_tokens=32, ignore_eos=True)
    cfg = EngineConfig(model_dir=default_model_dir, dtype="float32", kv_dtype=kv_dtype, device="cuda", num_blocks=64)
    engine = Engine(cfg, progress=False)
    eager = [engine.generate([p], params)[0].token_ids for p in prompts]
    runner = engine.runner
    runner.enable_prefill_graphs(256, 1024)
    graphs = runner.prefill_graphs
    assert graphs is not None and graphs.buckets == [16, 32, 64, 128, 256]
    assert [engine.generate([p], params)[0].token_ids for p in prompts] == eager

    ids = [t for p in prompts for t in p] * 8
    table = tuple(range(1, 1 + -(-(150 + 256) // cfg.block_size)))
    runner.forward([SeqChunk(tuple(ids[:150]), 0, table)])  # the cached prefix
    for t in (1, 16, 17, 100, 256):
        chunk = SeqChunk(tuple(ids[150 : 150 + t]), 150, table)
        runner.prefill_graphs = None
        want = runner.forward([chunk]).clone()
        runner.prefill_graphs = graphs
        got = runner.forward([chunk])
        assert got.shape == want.shape == (1, want.shape[-1])
        assert _rel(got, want) < (1e-3 if kv_dtype == "auto" else 1e-2) and got.argmax() == want.argmax(), t


def test_gate_up_epilogue_matches_separate_activation_on_default_model(default_model_dir):
    """The MLP's activation as the gate_up GEMV's epilogue, on every layer's real bf16 weights: the same values as
    the GEMV followed by the activation kernel (all but a few elements bit for bit, the rest one rounding apart) and
    the same error against float64. (Whole-model logits are no test here: this model in bf16 moves ~3% when a few
    MLP elements round one ulp differently, a GEMM against a GEMV does the same.)"""
    from kernels import ops
    from kernels import triton_gemv as g

    cfg = EngineConfig(model_dir=default_model_dir, dtype="bfloat16", device="cuda", num_blocks=16)
    engine = Engine(cfg, progress=False)
    torch.manual_seed(0)
    for layer in engine.model.model.layers:
        w = layer.mlp.gate_up_proj.weight
        x = torch.randn(1, w.shape[1], dtype=torch.bfloat16, device="cuda")
        epilogue = g.gemv(x, w, epilogue=g.SILU_MUL_OUT)[0].double()
        separate = ops.silu_and_mul(g.gemv(x, w)[0]).double()
        gate, up = torch.nn.functional.linear(x.double(), w.double()).chunk(2, dim=-1)
        exact = torch.nn.functional.silu(gate) * up
        assert (epilogue == separate).float().mean() >= 0.99
        assert _rel(epilogue, exact) <= 1.01 * _rel(separate, exact) + 1e-6

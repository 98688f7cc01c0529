"""The GPU path (Triton kernels, CUDA graphs) against HF transformers and the CPU path. Skipped without a GPU.

The 8B-shape test needs a random checkpoint: `kvrelay make-checkpoint --preset llama3-8b --out DIR --device cuda`
and KVRELAY_8B_CHECKPOINT=DIR.
"""

from __future__ import annotations

import os

import pytest
import torch

from gateway.tokenizer import Tokenizer
from services.model.engine import Engine, EngineConfig
from services.model.sampling_params import SamplingParams

pytestmark = pytest.mark.gpu

QUESTIONS = ["What is the capital of France?", "Write a haiku about the sea.", "List three prime numbers."]


def test_8b_shape_logits_match_hf_bf16():
    ckpt = os.environ.get("KVRELAY_8B_CHECKPOINT")
    if not ckpt:
        pytest.skip("set KVRELAY_8B_CHECKPOINT to a `make-checkpoint --preset llama3-8b` directory")
    transformers = pytest.importorskip("transformers")
    ids = torch.randint(0, 128256, (512,), generator=torch.Generator().manual_seed(0)).tolist()
    engine = Engine(EngineConfig(model_dir=ckpt, dtype="bfloat16", kv_dtype="auto"), progress=False)
    ours = engine.score(ids).float().cpu()
    del engine
    torch.cuda.empty_cache()
    refs = {}
    for dtype in (torch.bfloat16, torch.float32):  # fp32 tells how much of the gap is bf16 rounding itself
        hf = transformers.AutoModelForCausalLM.from_pretrained(ckpt, dtype=dtype).cuda().eval()
        with torch.no_grad():
            refs[dtype] = hf(torch.tensor([ids], device="cuda")).logits[0].float().cpu()
        del hf
        torch.cuda.empty_cache()

    def rel(a, b):
        return ((a - b).norm() / b.norm()).item()

    report = (
        f"ours-bf16 vs HF-bf16 {rel(ours, refs[torch.bfloat16]):.4f}, ours-bf16 vs HF-fp32 "
        f"{rel(ours, refs[torch.float32]):.4f}, HF-bf16 vs HF-fp32 {rel(refs[torch.bfloat16], refs[torch.float32]):.4f}"
    )
    print(report)
    assert rel(ours, refs[torch.bfloat16]) < 2e-2, report


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

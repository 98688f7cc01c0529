"""The runtime computes what HF transformers computes, on the same weights, through the paged KV pool."""

from __future__ import annotations

import pytest
import torch

from kvrelay.sampling import SamplingParams
from services.model.engine import Engine, EngineConfig
from services.model.loader_hf import iter_safetensors
from tests.conftest import save_tiny_checkpoint

transformers = pytest.importorskip("transformers")

GREEDY = SamplingParams(temperature=0.0, max_tokens=32)


def rel_error(ours: torch.Tensor, ref: torch.Tensor) -> float:
    return ((ours - ref).norm() / ref.norm()).item()


@pytest.fixture(scope="module")
def engine(default_model_dir) -> Engine:
    return Engine(EngineConfig(model_dir=default_model_dir, dtype="float32"), progress=False)


def test_converted_weights_equal_transformers_gguf_loader(default_model_dir, hf_reference_model):
    # Two independent dequantizations + Q/K un-permutations of the same Q4_1 file must agree bit for bit.
    ref = hf_reference_model.state_dict()
    names = 0
    for name, tensor in iter_safetensors(default_model_dir, progress=False):
        assert torch.equal(tensor, ref[name]), name
        names += 1
    assert names == 272


def test_logits_128_tokens_match_hf(engine, hf_reference_model, english_text):
    from kvrelay.tokenizer import Tokenizer

    ids = Tokenizer.from_dir(engine.cfg.model_dir).encode(english_text)[:128]
    assert len(ids) == 128
    ours = engine.score(ids)
    with torch.no_grad():
        ref = hf_reference_model(torch.tensor([ids])).logits[0].float()
    assert rel_error(ours, ref) < 1e-4


def hf_greedy(model, prompt: list[int], n: int) -> list[int]:
    with torch.no_grad():
        out = model.generate(
            torch.tensor([prompt]), max_new_tokens=n, do_sample=False, eos_token_id=None, pad_token_id=0
        )
    return out[0, len(prompt) :].tolist()


def test_greedy_32_tokens_match_hf_batched(engine, hf_reference_model):
    from kvrelay.tokenizer import Tokenizer

    tok = Tokenizer.from_dir(engine.cfg.model_dir)
    questions = ["What is the capital of France?", "Write a haiku about the sea.", "List three prime numbers."]
    prompts = [tok.encode_chat([{"role": "user", "content": q}]) for q in questions]
    prompts.append(tok.encode("The quick brown fox"))  # raw text, different length: a ragged batch
    params = SamplingParams(temperature=0.0, max_tokens=32, ignore_eos=True)
    results = engine.generate(prompts, params)
    for prompt, result in zip(prompts, results, strict=True):
        assert result.token_ids == hf_greedy(hf_reference_model, prompt, 32)
        assert result.finish_reason == "length"


def tiny_variants():
    llama3 = transformers.LlamaConfig(
        vocab_size=320,
        hidden_size=96,
        intermediate_size=160,
        num_hidden_layers=3,
        num_attention_heads=6,
        num_key_value_heads=2,  # GQA 3:1
        max_position_embeddings=512,
        rope_theta=500000.0,
        rope_scaling={
            "rope_type": "llama3",
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 64,  # small, so the scaled band is exercised at these lengths
        },
        tie_word_embeddings=False,
    )
    qwen2 = transformers.Qwen2Config(
        vocab_size=300,
        hidden_size=80,
        intermediate_size=136,
        num_hidden_layers=2,
        num_attention_heads=5,
        num_key_value_heads=1,
        max_position_embeddings=512,
        tie_word_embeddings=True,
    )
    mistral = transformers.MistralConfig(
        vocab_size=256,
        hidden_size=64,
        intermediate_size=112,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=24,  # head_dim != hidden / heads
        max_position_embeddings=512,
        sliding_window=None,
    )
    return {"llama3-gqa-rope-scaling": llama3, "qwen2-bias-tied": qwen2, "mistral-head-dim": mistral}


@pytest.mark.parametrize("variant", sorted(tiny_variants()))
@pytest.mark.parametrize("block_size", [1, 16])
def test_tiny_random_checkpoints_match_hf(variant, block_size, tmp_path):
    hf_config = tiny_variants()[variant]
    model_dir = save_tiny_checkpoint(hf_config, tmp_path / variant)
    hf_model = transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    if variant.startswith("qwen2"):
        assert hf_model.model.layers[0].self_attn.q_proj.bias is not None  # the bias path is really exercised
    engine = Engine(EngineConfig(model_dir=model_dir, dtype="float32", block_size=block_size), progress=False)
    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(0, hf_config.vocab_size, (150,), generator=gen).tolist()
    with torch.no_grad():
        ref = hf_model(torch.tensor([ids])).logits[0]
    assert rel_error(engine.score(ids), ref) < 1e-4
    # chunked prefill over a cached prefix (two passes of 64 + 86) gives the same logits
    chunked = Engine(EngineConfig(model_dir=model_dir, dtype="float32", max_batch_tokens=64), progress=False)
    assert rel_error(chunked.score(ids), ref) < 1e-4
    prompt = ids[:20]
    result = engine.generate([prompt], SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True))[0]
    assert result.token_ids == hf_greedy(hf_model, prompt, 12)


def test_make_checkpoint_preset_loads_in_hf_and_kvrelay(tmp_path):
    from kvrelay.cli import main

    assert main(["make-checkpoint", "--preset", "tiny-llama3", "--out", str(tmp_path / "ckpt")]) == 0
    hf_model = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "ckpt", dtype=torch.float32).eval()
    engine = Engine(EngineConfig(model_dir=tmp_path / "ckpt", dtype="float32"), progress=False)
    ids = list(range(3, 200))
    with torch.no_grad():
        ref = hf_model(torch.tensor([ids])).logits[0]
    assert rel_error(engine.score(ids), ref) < 1e-4
    assert main(["make-checkpoint", "--preset", "nope", "--out", str(tmp_path / "x")]) == 2

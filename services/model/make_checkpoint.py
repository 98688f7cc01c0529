"""Random-weight checkpoints of real model shapes in the HF safetensors layout (sharded, with an index).

Benchmarks need the shape, not the values: speed does not depend on the weights, and correctness is checked against
HF transformers on the same random weights. `kvrelay make-checkpoint --preset llama3-8b --out DIR`.

The values still matter for that check. Drawn naively (HF's `_init_weights`: N(0, 0.02) for every matrix, embeddings
included), a deep, wide network is chaotic: the embeddings are ~100x smaller than what each layer adds, so every layer
rewrites the residual stream instead of updating it, and the q/k/gate pre-activations grow with the width (0.02 *
sqrt(hidden) per unit input), so the rounding of each bf16 operation is amplified layer after layer. On the Llama-3-8B
shape HF transformers in bf16 then differs from itself in fp32 by 7% (logits, relative L2; 0.0713 on the CPU, 0.071
on an H200), and so does any other bf16 implementation (ours: 0.069): nothing tighter can be asserted. Trained
networks are far better conditioned, so the checkpoints use a standard training init, torchtitan's for Llama 3
(PyTorch's reference pretraining code, `torchtitan/models/llama3/model/model.py`, `init_weights`), which is the
GPT-2/Megatron-LM scheme plus unit embeddings:

- token embeddings N(0, 1): the residual stream starts at unit scale, and each layer is a small update to it;
- q, k, v and gate projections N(0, 0.02);
- o_proj and down_proj, which write the residual stream, and up_proj: N(0, 0.02 / sqrt(2 * num_layers)), so the
  2 * num_layers branch outputs add up to the size of one (GPT-2 / Megatron-LM's scaled init);
- lm_head N(0, 1 / sqrt(hidden)): unit-scale logits (torchtitan truncates it at 3 sigma; not here, where trunc_normal_
  would take most of the CPU time to move 0.3% of the values);
- RMSNorm weights 1, here perturbed by 10% noise (so a kernel that drops or misindexes them still fails the HF check),
  and q/k/v biases (Qwen2) N(0, 0.02) for the same reason, where the usual init has zeros.

A tied lm_head is the N(0, 1) embedding: logits then scale with sqrt(hidden), which the benchmarks do not mind. What
is left is the rounding of the unit-scale residual stream itself, 64 times over 32 layers, which a trained network
shows too. HF in bf16 against HF in fp32, 512 random tokens: 0.0148 on the 8B shape (ours in bf16 against HF in bf16:
0.0127), 0.010-0.014 at hidden 512-2048 with the 8B's depth and head layout, where the naive init gives 0.013, 0.018,
0.037 (doubling with each doubling of the width, up to 0.071 at 4096); the trained SmolLM2-135M (30 layers) 0.010 on
random tokens, 0.017 on English. tests/services/test_make_checkpoint.py checks a narrow model with the 8B's gains.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterator
from pathlib import Path

import torch
from safetensors.torch import save_file
from tqdm import tqdm

LLAMA3_ROPE = {
    "rope_type": "llama3",
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 8192,
}

PRESETS: dict[str, dict] = {
    "llama3-8b": dict(
        architectures=["LlamaForCausalLM"],
        model_type="llama",
        vocab_size=128256,
        hidden_size=4096,
        intermediate_size=14336,
        num_hidden_layers=32,
        num_attention_heads=32,
        num_key_value_heads=8,
        max_position_embeddings=131072,
        rope_theta=500000.0,
        rope_scaling=LLAMA3_ROPE,
        rms_norm_eps=1e-5,
        tie_word_embeddings=False,
        bos_token_id=128000,
        eos_token_id=128001,
    ),
    "llama3.2-1b": dict(
        architectures=["LlamaForCausalLM"],
        model_type="llama",
        vocab_size=128256,
        hidden_size=2048,
        intermediate_size=8192,
        num_hidden_layers=16,
        num_attention_heads=32,
        num_key_value_heads=8,
        head_dim=64,
        max_position_embeddings=131072,
        rope_theta=500000.0,
        rope_scaling=LLAMA3_ROPE | {"factor": 32.0},
        rms_norm_eps=1e-5,
        tie_word_embeddings=True,
        bos_token_id=128000,
        eos_token_id=128001,
    ),
    "qwen2.5-0.5b": dict(
        architectures=["Qwen2ForCausalLM"],
        model_type="qwen2",
        vocab_size=151936,
        hidden_size=896,
        intermediate_size=4864,
        num_hidden_layers=24,
        num_attention_heads=14,
        num_key_value_heads=2,
        max_position_embeddings=32768,
        rope_theta=1000000.0,
        rms_norm_eps=1e-6,
        tie_word_embeddings=True,
        bos_token_id=151643,
        eos_token_id=151645,
    ),
    "mistral-7b": dict(
        architectures=["MistralForCausalLM"],
        model_type="mistral",
        vocab_size=32768,
        hidden_size=4096,
        intermediate_size=14336,
        num_hidden_layers=32,
        num_attention_heads=32,
        num_key_value_heads=8,
        head_dim=128,
        max_position_embeddings=32768,
        rope_theta=1000000.0,
        rms_norm_eps=1e-5,
        tie_word_embeddings=False,
        sliding_window=None,
        bos_token_id=1,
        eos_token_id=2,
    ),
    # for tests: every feature (GQA, llama3 rope scaling) at a size the CPU runs in milliseconds
    "tiny-llama3": dict(
        architectures=["LlamaForCausalLM"],
        model_type="llama",
        vocab_size=512,
        hidden_size=128,
        intermediate_size=256,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=2048,
        rope_theta=500000.0,
        rope_scaling=LLAMA3_ROPE | {"original_max_position_embeddings": 256},
        rms_norm_eps=1e-5,
        tie_word_embeddings=False,
        bos_token_id=1,
        eos_token_id=2,
    ),
}

SHARD_BYTES = 4 * 2**30


def tensor_shapes(c: dict) -> dict[str, tuple[int, ...]]:
    h, inter = c["hidden_size"], c["intermediate_size"]
    head_dim = c.get("head_dim") or h // c["num_attention_heads"]
    q, kv = c["num_attention_heads"] * head_dim, c["num_key_value_heads"] * head_dim
    bias = c["model_type"] == "qwen2"
    shapes = {"model.embed_tokens.weight": (c["vocab_size"], h)}
    for i in range(c["num_hidden_layers"]):
        p = f"model.layers.{i}."
        shapes |= {
            p + "input_layernorm.weight": (h,),
            p + "post_attention_layernorm.weight": (h,),
            p + "self_attn.q_proj.weight": (q, h),
            p + "self_attn.k_proj.weight": (kv, h),
            p + "self_attn.v_proj.weight": (kv, h),
            p + "self_attn.o_proj.weight": (h, q),
            p + "mlp.gate_proj.weight": (inter, h),
            p + "mlp.up_proj.weight": (inter, h),
            p + "mlp.down_proj.weight": (h, inter),
        }
        if bias:
            shapes |= {
                p + "self_attn.q_proj.bias": (q,),
                p + "self_attn.k_proj.bias": (kv,),
                p + "self_attn.v_proj.bias": (kv,),
            }
    shapes["model.norm.weight"] = (h,)
    if not c["tie_word_embeddings"]:
        shapes["lm_head.weight"] = (c["vocab_size"], h)
    return shapes


BASE_STD = 0.02
# the projections whose output is added to the residual stream (and up_proj, which scales down_proj's input)
SCALED = ("self_attn.o_proj.weight", "mlp.down_proj.weight", "mlp.up_proj.weight")


def random_tensors(
    config: dict, seed: int = 0, device: str = "cpu", base_std: float = BASE_STD
) -> Iterator[tuple[str, torch.Tensor]]:
    """(name, float32 tensor on device) for every tensor of the checkpoint, in tensor_shapes order, drawn from one
    generator: torchtitan's Llama 3 init (see the module docstring for why). base_std: tests only, to give a narrow
    model the per-layer gains (base_std * sqrt(hidden)) of a wide one."""
    gen = torch.Generator(device=device).manual_seed(seed)
    scaled_std = base_std / math.sqrt(2 * config["num_hidden_layers"])

    def normal(shape: tuple[int, ...], std: float) -> torch.Tensor:
        return std * torch.randn(shape, generator=gen, device=device)

    for name, shape in tensor_shapes(config).items():
        if name.endswith("norm.weight"):
            t = 1.0 + normal(shape, 0.1)
        elif name == "model.embed_tokens.weight":
            t = normal(shape, 1.0)
        elif name == "lm_head.weight":
            t = normal(shape, config["hidden_size"] ** -0.5)
        else:
            t = normal(shape, scaled_std if name.endswith(SCALED) else base_std)
        yield name, t


def make_checkpoint(preset: str, out: str | Path, dtype: str = "bfloat16", seed: int = 0, device: str = "cpu") -> Path:
    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; choose from {', '.join(PRESETS)}")
    config = dict(PRESETS[preset], torch_dtype=dtype)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    torch_dtype = getattr(torch, dtype)
    shapes = tensor_shapes(config)
    # Shards are written as they fill (an 8B checkpoint never sits in memory whole) and renamed once counted.
    shard, shard_bytes, written, total_size = {}, 0, [], 0

    def flush() -> None:
        nonlocal shard, shard_bytes
        if shard:
            path = out / f"part-{len(written):05d}.safetensors.tmp"
            save_file(shard, str(path), metadata={"format": "pt"})
            written.append((path, list(shard)))
            shard, shard_bytes = {}, 0

    tensors = random_tensors(config, seed, device)
    for name, t in tqdm(tensors, total=len(shapes), desc=f"random {preset}", unit="tensor"):
        shard[name] = t.to(torch_dtype).cpu()
        shard_bytes += shard[name].numel() * shard[name].element_size()
        total_size += shard[name].numel() * shard[name].element_size()
        if shard_bytes >= SHARD_BYTES:
            flush()
    flush()
    total, weight_map = len(written), {}
    for i, (path, names) in enumerate(written):
        fname = "model.safetensors" if total == 1 else f"model-{i + 1:05d}-of-{total:05d}.safetensors"
        path.rename(out / fname)
        weight_map |= {name: fname for name in names}
    if total > 1:
        index = {"metadata": {"total_size": total_size}, "weight_map": weight_map}
        (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    (out / "config.json").write_text(json.dumps(config, indent=2))
    return out

"""Build a model from an HF-layout directory: modules on the meta device, parameters assigned from the checkpoint."""

from __future__ import annotations

from pathlib import Path

import torch

from kernels.rotary import compute_inv_freq, make_cos_sin_cache
from kvrelay.model_config import ModelConfig, ModelConfigError
from services.model.llama import LlamaForCausalLM
from services.model.loader_hf import iter_safetensors


def load_weights(
    model_dir: str | Path, config: ModelConfig, dtype: torch.dtype, device: torch.device | str, progress: bool = True
) -> dict[str, torch.Tensor]:
    """The checkpoint's tensors in HF names, cast to dtype on device; a tied lm_head shares the embedding."""
    weights = {}
    for name, tensor in iter_safetensors(model_dir, progress):
        if "rotary_emb" in name:
            continue  # some checkpoints store inv_freq; kvrelay computes it
        weights[name] = tensor.to(device=device, dtype=dtype)
    if "lm_head.weight" not in weights:
        if not config.tie_word_embeddings:
            raise ModelConfigError(f"{model_dir}: lm_head.weight missing and tie_word_embeddings is false")
        weights["lm_head.weight"] = weights["model.embed_tokens.weight"]
    return merge_projections(weights, config)


MERGED = {"self_attn.qkv_proj": ("q_proj", "k_proj", "v_proj"), "mlp.gate_up_proj": ("gate_proj", "up_proj")}


def merge_projections(weights: dict[str, torch.Tensor], config: ModelConfig) -> dict[str, torch.Tensor]:
    """q/k/v into one qkv_proj and gate/up into one gate_up_proj: one GEMM instead of three (two) per layer, which at
    decode batch sizes is one weight stream and one launch instead of several. Done before the kvstore packs the
    weights, so the merged tensors are what every worker maps."""
    for i in range(config.num_layers):
        for merged, parts in MERGED.items():
            prefix, _, _ = merged.rpartition(".")
            for kind in ("weight", "bias"):
                names = [f"model.layers.{i}.{prefix}.{p}.{kind}" for p in parts]
                if all(n in weights for n in names):
                    weights[f"model.layers.{i}.{merged}.{kind}"] = torch.cat([weights.pop(n) for n in names])
    return weights


def build_model(
    config: ModelConfig, weights: dict[str, torch.Tensor], max_positions: int | None = None
) -> LlamaForCausalLM:
    """Point a meta-device model at `weights` (loaded here, or views into a region shared by another process)."""
    with torch.device("meta"):
        model = LlamaForCausalLM(config)
    expected = set(model.state_dict().keys())
    missing, unexpected = expected - set(weights), set(weights) - expected
    if missing or unexpected:
        raise ModelConfigError(
            f"checkpoint does not match {config.architecture}: "
            f"missing {sorted(missing)[:5]}, unexpected {sorted(unexpected)[:5]}"
        )
    model.load_state_dict(weights, assign=True, strict=True)
    any_weight = weights["model.embed_tokens.weight"]
    inv_freq = compute_inv_freq(config.head_dim, config.rope_theta, config.rope_scaling)
    positions = max_positions or config.max_position_embeddings
    model.cos_sin_cache = make_cos_sin_cache(inv_freq, positions, torch.float32).to(any_weight.device)
    return model.eval().requires_grad_(False)


def load_model(
    model_dir: str | Path, dtype: torch.dtype, device: torch.device | str = "cpu", progress: bool = True
) -> LlamaForCausalLM:
    config = ModelConfig.from_dir(model_dir)
    return build_model(config, load_weights(model_dir, config, dtype, device, progress))

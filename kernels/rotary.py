"""Rotary position embedding (neox style, HF Llama's rotate_half), torch reference, and its frequency tables.

The cos/sin cache is [max_positions, rot_dim]: cos of the rot_dim // 2 frequencies, then their sin (vLLM's layout).
Position p, pair j rotates (x[j], x[j + rot_dim // 2]) by angle p * inv_freq[j]. rot_dim < head_dim (partial
rotary) leaves the trailing dims unrotated.
"""

from __future__ import annotations

import math
from typing import Any

import torch


def compute_inv_freq(head_dim: int, rope_theta: float, rope_scaling: dict[str, Any] | None) -> torch.Tensor:
    """Inverse frequencies [head_dim // 2] float32, as HF transformers computes them (ROPE_INIT_FUNCTIONS).

    rope_scaling: None (or rope_type "default"), "linear" ({"factor"}) or "llama3" (Llama 3.1: {"factor",
    "low_freq_factor", "high_freq_factor", "original_max_position_embeddings"}). The type is read from "rope_type"
    or the legacy "type" key.
    """
    # Same ops as HF (int64 arange cast to float32, then the power) so the values agree exactly.
    inv_freq = 1.0 / (rope_theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64).to(torch.float) / head_dim))
    if rope_scaling is None:
        return inv_freq
    rope_type = rope_scaling.get("rope_type", rope_scaling.get("type", "default"))
    if rope_type == "default":
        return inv_freq
    if rope_type == "linear":
        return inv_freq / rope_scaling["factor"]
    if rope_type == "llama3":
        return _llama3_inv_freq(inv_freq, rope_scaling)
    raise ValueError(f"unsupported rope_scaling type {rope_type!r} (supported: default, linear, llama3)")


def _llama3_inv_freq(inv_freq: torch.Tensor, rope_scaling: dict[str, Any]) -> torch.Tensor:
    """Llama 3.1's frequency-dependent scaling: long wavelengths divided by factor, short ones kept, the band between
    interpolated smoothly. Mirrors HF's _compute_llama3_parameters step by step."""
    factor = rope_scaling["factor"]
    low_freq_factor = rope_scaling["low_freq_factor"]
    high_freq_factor = rope_scaling["high_freq_factor"]
    old_context_len = rope_scaling["original_max_position_embeddings"]

    low_freq_wavelen = old_context_len / low_freq_factor
    high_freq_wavelen = old_context_len / high_freq_factor
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > low_freq_wavelen, inv_freq / factor, inv_freq)
    smooth_factor = (old_context_len / wavelen - low_freq_factor) / (high_freq_factor - low_freq_factor)
    smoothed = (1 - smooth_factor) * scaled / factor + smooth_factor * scaled
    is_medium_freq = ~(wavelen < high_freq_wavelen) * ~(wavelen > low_freq_wavelen)
    return torch.where(is_medium_freq, smoothed, scaled)


def make_cos_sin_cache(inv_freq: torch.Tensor, max_positions: int, dtype: torch.dtype) -> torch.Tensor:
    """[max_positions, 2 * len(inv_freq)] = cat(cos, sin) of positions x frequencies, computed in float32."""
    positions = torch.arange(max_positions, dtype=torch.float32, device=inv_freq.device)
    # [max_positions, rot_dim // 2]; an outer product, the same float32 products HF forms per position.
    freqs = positions[:, None] * inv_freq.float()[None, :]
    return torch.cat([freqs.cos(), freqs.sin()], dim=-1).to(dtype)


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    # x [num_tokens, heads, head_dim]; cos, sin [num_tokens, 1, rot_dim // 2] float32
    half = cos.shape[-1]
    x32 = x.float()
    x1 = x32[..., :half]
    x2 = x32[..., half : 2 * half]
    rotated = torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin, x32[..., 2 * half :]], dim=-1)
    return rotated.to(x.dtype)


def check_rotary_args(positions: torch.Tensor, query: torch.Tensor, key: torch.Tensor, cos_sin_cache: torch.Tensor):
    """The shape contract of the Triton rotary kernels (rotary, rotary_store_kv): ValueError saying what does not
    fit. Returns rot_dim, the rotated dims of a head (the cache's width)."""
    num_tokens, _, head_dim = query.shape
    if key.dim() != 3 or key.shape[0] != num_tokens or key.shape[2] != head_dim:
        raise ValueError(f"key must be [num_tokens={num_tokens}, num_kv_heads, {head_dim}], got {tuple(key.shape)}")
    if positions.shape != (num_tokens,):
        raise ValueError(f"positions must be [num_tokens={num_tokens}], got {tuple(positions.shape)}")
    rot_dim = cos_sin_cache.shape[-1]
    if rot_dim % 2 != 0 or rot_dim > head_dim:
        raise ValueError(f"cos_sin_cache rot_dim {rot_dim} must be even and <= head_dim {head_dim}")
    return rot_dim


def rotary_ref(
    positions: torch.Tensor, query: torch.Tensor, key: torch.Tensor, cos_sin_cache: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotate query [num_tokens, num_heads, head_dim] and key [num_tokens, num_kv_heads, head_dim] by their
    positions [num_tokens] (int). Returns new (query, key) in their dtypes; math in float32 with the cache's values.
    """
    # [num_tokens, rot_dim] -> [num_tokens, 1, rot_dim // 2] each, broadcast over heads
    cos, sin = cos_sin_cache[positions.long()].float().unsqueeze(1).chunk(2, dim=-1)
    return _rotate(query, cos, sin), _rotate(key, cos, sin)

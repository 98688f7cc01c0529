"""store_kv, torch reference: quantize new K/V per the pool's formats and scatter them into their slots."""

from __future__ import annotations

import torch

from kvstore.formats import KVFormat, LayerKV, quantize


def _scatter(
    cache: torch.Tensor, scale_cache: torch.Tensor | None, x: torch.Tensor, fmt: KVFormat, slots: torch.Tensor
) -> None:
    data, scale = quantize(x, fmt, cache.dtype)  # the pool's fp8 flavour, whatever this platform's
    # A layer's cache is contiguous, so it views as one row per slot: [num_blocks * block_size, num_kv_heads, head_dim]
    rows = cache.view(-1, *cache.shape[2:])
    rows[slots] = data
    if scale_cache is not None:
        assert scale is not None
        # [num_blocks * block_size, num_kv_heads]
        scale_cache.view(-1, scale_cache.shape[-1])[slots] = scale


def check_store_kv_args(key: torch.Tensor, value: torch.Tensor, layer: LayerKV, slot_mapping: torch.Tensor) -> None:
    """The shape contract of store_kv (reference and Triton): ValueError saying what does not fit."""
    if key.shape != value.shape or key.dim() != 3:
        raise ValueError(
            f"key and value must both be [num_tokens, num_kv_heads, head_dim], got {key.shape}, {value.shape}"
        )
    if key.shape[1:] != layer.k_cache.shape[2:]:
        raise ValueError(
            f"key heads/head_dim {tuple(key.shape[1:])} do not match the pool {tuple(layer.k_cache.shape[2:])}"
        )
    if slot_mapping.shape != key.shape[:1]:
        raise ValueError(f"slot_mapping must be [num_tokens={key.shape[0]}], got {tuple(slot_mapping.shape)}")


def store_kv_ref(key: torch.Tensor, value: torch.Tensor, layer: LayerKV, slot_mapping: torch.Tensor) -> None:
    """Write key/value [num_tokens, num_kv_heads, head_dim] into `layer` at slot_mapping [num_tokens] int64.

    slot = block_id * block_size + offset; slot -1 marks a padding token (as in vLLM) and is skipped.
    """
    check_store_kv_args(key, value, layer, slot_mapping)
    valid = slot_mapping >= 0
    # [num_valid]
    slots = slot_mapping[valid].long()
    _scatter(layer.k_cache, layer.k_scale, key[valid], layer.k_format, slots)
    _scatter(layer.v_cache, layer.v_scale, value[valid], layer.v_format, slots)

"""rotary + store_kv, torch reference: the two references in sequence (what the Triton kernel fuses)."""

from __future__ import annotations

import torch

from kernels.rotary import rotary_ref
from kernels.store_kv import store_kv_ref
from kvstore.formats import LayerKV


def rotary_store_kv_ref(
    positions: torch.Tensor,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    cos_sin_cache: torch.Tensor,
    layer: LayerKV,
    slot_mapping: torch.Tensor,
) -> torch.Tensor:
    """Rotate query [num_tokens, num_heads, head_dim] and key [num_tokens, num_kv_heads, head_dim] by their
    positions [num_tokens], store the rotated key and value [num_tokens, num_kv_heads, head_dim] into `layer` at
    slot_mapping [num_tokens] (slot -1: padding, skipped). Returns the rotated query (a new tensor).

    The rotated key is rounded to key.dtype before it is quantized (rotary_ref returns it in that dtype).
    """
    query, key = rotary_ref(positions, query, key, cos_sin_cache)
    store_kv_ref(key, value, layer, slot_mapping)
    return query

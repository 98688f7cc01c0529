"""paged_decode_attention, torch reference: one new query token per sequence attends over its cached K/V.

The cache is read through block tables and dequantized with its scales; scores and softmax are float32. A loop over
sequences (not tokens) keeps this clear; the Triton kernel does the same math with split-K and GQA heads packed.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from kernels.rotary_store_kv import rotary_store_kv_ref
from kvstore.formats import LayerKV


@dataclass(frozen=True)
class NewToken:
    """A decode step's new token per sequence, for attention that also rotates and stores it: its unrotated key and
    value [num_seqs, num_kv_heads, head_dim], positions [num_seqs], the rotary cos/sin cache [max_positions, rot_dim]
    and the slots [num_seqs] it goes to (-1: batch padding, not stored)."""

    positions: torch.Tensor
    key: torch.Tensor
    value: torch.Tensor
    cos_sin_cache: torch.Tensor
    slot_mapping: torch.Tensor


def rotary_store_decode_attention_ref(query, layer, block_tables, context_lens, scale, new: NewToken) -> torch.Tensor:
    """rotary_store_kv_ref of the new token (query unrotated), then paged_decode_attention_ref: what the Triton
    decode kernel does in one launch when given `new`."""
    query = rotary_store_kv_ref(new.positions, query, new.key, new.value, new.cos_sin_cache, layer, new.slot_mapping)
    return paged_decode_attention_ref(query, layer, block_tables, context_lens, scale)


def paged_decode_attention_ref(
    query: torch.Tensor,
    layer: LayerKV,
    block_tables: torch.Tensor,
    context_lens: torch.Tensor,
    scale: float,
) -> torch.Tensor:
    """Attention of each sequence's query over its first context_lens[b] cached tokens (which include the query's own
    K/V, stored beforehand).

    query:        [num_seqs, num_heads, head_dim]; num_heads a multiple of num_kv_heads (GQA: query head h reads
                  kv head h // (num_heads // num_kv_heads), as HF's repeat_kv)
    block_tables: [num_seqs, max_blocks] int32
    context_lens: [num_seqs] int32; a sequence with 0 (batch padding) gets a zero output
    returns:      [num_seqs, num_heads, head_dim] in query's dtype
    """
    num_seqs, num_heads, head_dim = query.shape
    num_kv_heads = layer.num_kv_heads
    if num_heads % num_kv_heads != 0:
        raise ValueError(f"num_heads {num_heads} is not a multiple of num_kv_heads {num_kv_heads}")
    if head_dim != layer.head_dim:
        raise ValueError(f"query head_dim {head_dim} != pool head_dim {layer.head_dim}")
    group = num_heads // num_kv_heads
    out = torch.zeros_like(query)
    lens = context_lens.tolist()
    for b in range(num_seqs):
        num_tokens = lens[b]
        if num_tokens == 0:
            continue
        # [num_tokens, num_kv_heads, head_dim] float32
        k, v = layer.gather(block_tables[b], num_tokens)
        # [num_kv_heads, group, head_dim]
        q = query[b].float().view(num_kv_heads, group, head_dim)
        # [num_kv_heads, group, num_tokens]
        scores = torch.einsum("hgd,thd->hgt", q, k) * scale
        probs = torch.softmax(scores, dim=-1)
        # [num_kv_heads, group, head_dim] -> [num_heads, head_dim]
        out[b] = torch.einsum("hgt,thd->hgd", probs, v).reshape(num_heads, head_dim).to(query.dtype)
    return out

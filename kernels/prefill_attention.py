"""paged_prefill_attention, torch reference: varlen causal attention of new tokens over a cached prefix plus themselves.

The new tokens' K/V are stored into the pool first (store_kv), so every key is read from the pool the same way:
a chunked prefill or a resumed session simply has a longer cached prefix. Scores and softmax are float32.
"""

from __future__ import annotations

import torch

from kvstore.formats import LayerKV


def paged_prefill_attention_ref(
    query: torch.Tensor,
    layer: LayerKV,
    block_tables: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    context_lens: torch.Tensor,
    scale: float,
) -> torch.Tensor:
    """query:        [num_tokens, num_heads, head_dim], the new tokens of all sequences concatenated
    block_tables: [num_seqs, max_blocks] int32
    cu_seqlens_q: [num_seqs + 1] int32; sequence b's new tokens are query[cu_seqlens_q[b]:cu_seqlens_q[b+1]]
    context_lens: [num_seqs] int32; all tokens of sequence b, new ones included (all already in the pool)
    returns:      [num_tokens, num_heads, head_dim] in query's dtype

    New token i of sequence b (q_len_b new tokens) is at position context_len_b - q_len_b + i and attends keys
    0..that position. GQA as in decode: query head h reads kv head h // (num_heads // num_kv_heads). Rows past
    cu_seqlens_q[-1] are padding (a CUDA graph's token bucket): no sequence reads them, their output is 0 here
    (the Triton kernel leaves them unwritten).
    """
    num_tokens, num_heads, head_dim = query.shape
    num_kv_heads = layer.num_kv_heads
    if num_heads % num_kv_heads != 0:
        raise ValueError(f"num_heads {num_heads} is not a multiple of num_kv_heads {num_kv_heads}")
    if head_dim != layer.head_dim:
        raise ValueError(f"query head_dim {head_dim} != pool head_dim {layer.head_dim}")
    group = num_heads // num_kv_heads
    cu = cu_seqlens_q.tolist()
    lens = context_lens.tolist()
    if len(cu) != len(lens) + 1 or cu[0] != 0 or cu[-1] > num_tokens or cu != sorted(cu):
        raise ValueError(f"cu_seqlens_q {cu} does not split {num_tokens} tokens into {len(lens)} sequences")
    out = torch.zeros_like(query)
    for b, context_len in enumerate(lens):
        start, end = cu[b], cu[b + 1]
        q_len = end - start
        if q_len == 0:
            continue
        if q_len > context_len:
            raise ValueError(f"sequence {b} has {q_len} new tokens but context_len {context_len}")
        # [context_len, num_kv_heads, head_dim] float32
        k, v = layer.gather(block_tables[b], context_len)
        # [q_len, num_kv_heads, group, head_dim]
        q = query[start:end].float().view(q_len, num_kv_heads, group, head_dim)
        # [num_kv_heads, group, q_len, context_len]
        scores = torch.einsum("qhgd,thd->hgqt", q, k) * scale
        # Causal over absolute positions: query i sits at context_len - q_len + i.
        q_pos = torch.arange(context_len - q_len, context_len, device=query.device)
        k_pos = torch.arange(context_len, device=query.device)
        # [q_len, context_len]
        visible = k_pos[None, :] <= q_pos[:, None]
        scores = scores.masked_fill(~visible, float("-inf"))
        probs = torch.softmax(scores, dim=-1)
        # [q_len, num_kv_heads, group, head_dim] -> [q_len, num_heads, head_dim]
        o = torch.einsum("hgqt,thd->qhgd", probs, v)
        out[start:end] = o.reshape(q_len, num_heads, head_dim).to(query.dtype)
    return out

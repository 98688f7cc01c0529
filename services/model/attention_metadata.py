"""What one forward pass needs to find its KV blocks: built by the runner, read by every attention layer."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class AttentionMetadata:
    is_prefill: bool
    # [num_tokens] int64: pool slot (block_id * block_size + offset) each new token's K/V is written to
    slot_mapping: torch.Tensor
    # [num_seqs, max_blocks] int32, padded with 0
    block_tables: torch.Tensor
    # [num_seqs] int32: tokens of each sequence in the pool after this step (cached prefix + new tokens)
    context_lens: torch.Tensor
    # [num_seqs + 1] int32: prefix sums of the new tokens per sequence (prefill only; decode has one per sequence)
    cu_seqlens_q: torch.Tensor | None = None
    # Host-side upper bounds the GPU kernels size their grids with (never read from device tensors, so a step can be
    # captured in a CUDA graph): the longest new-token run, and the longest context.
    max_query_len: int | None = None
    max_context_len: int | None = None

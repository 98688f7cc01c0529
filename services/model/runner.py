"""One forward pass over a batch of sequences that each add new tokens on top of what the pool already holds.

Prefill (many new tokens), chunked prefill (new tokens after a cached prefix) and decode (one new token each) are
the same call; a batch where every sequence adds exactly one token takes the decode attention kernel.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from kvstore.block_table import make_block_table_tensor, slot_mapping
from kvstore.pool import KVPool
from services.model.attention_metadata import AttentionMetadata
from services.model.llama import LlamaForCausalLM


@dataclass(frozen=True)
class SeqChunk:
    """One sequence's part of a batch: `token_ids` are computed now, after `num_cached` tokens already in the pool."""

    token_ids: tuple[int, ...]
    num_cached: int
    # block ids covering at least num_cached + len(token_ids) tokens
    block_table: tuple[int, ...]


class ModelRunner:
    def __init__(self, model: LlamaForCausalLM, pool: KVPool) -> None:
        self.model = model
        self.pool = pool
        self.block_size = pool.geometry.block_size
        self.device = model.lm_head.weight.device
        self.graphs = None

    def enable_cuda_graphs(self, max_batch: int, max_context_len: int) -> None:
        """Capture decode steps for batch-size buckets up to max_batch (GPU only; the CPU path stays eager)."""
        from services.model.cuda_graphs import DecodeGraphs

        if self.device.type != "cuda":
            return
        self.graphs = DecodeGraphs(self.model, self.pool, max_batch, max_context_len)
        self.graphs.capture()

    @torch.inference_mode()
    def forward(self, chunks: list[SeqChunk], all_logits: bool = False) -> torch.Tensor:
        """Logits [num_seqs, vocab] for each sequence's last new token, or [num_tokens, vocab] with all_logits."""
        input_ids, positions, slots, lens = [], [], [], [0]
        for chunk in chunks:
            end = chunk.num_cached + len(chunk.token_ids)
            if len(chunk.block_table) * self.block_size < end:
                raise ValueError(f"block table covers {len(chunk.block_table) * self.block_size} < {end} tokens")
            input_ids.extend(chunk.token_ids)
            positions.extend(range(chunk.num_cached, end))
            slots.extend(slot_mapping(list(chunk.block_table), chunk.num_cached, end, self.block_size))
            lens.append(lens[-1] + len(chunk.token_ids))
        device = self.device
        is_decode = all(len(c.token_ids) == 1 for c in chunks)
        if self.graphs is not None and is_decode and not all_logits and self.graphs.bucket(len(chunks)):
            return self.graphs.replay(
                torch.tensor(input_ids, dtype=torch.int64, device=device),
                torch.tensor(positions, dtype=torch.int64, device=device),
                torch.tensor(slots, dtype=torch.int64, device=device),
                make_block_table_tensor([list(c.block_table) for c in chunks], device),
                torch.tensor([c.num_cached + 1 for c in chunks], dtype=torch.int32, device=device),
            )
        cu_seqlens = torch.tensor(lens, dtype=torch.int32, device=device)
        meta = AttentionMetadata(
            is_prefill=not is_decode,
            slot_mapping=torch.tensor(slots, dtype=torch.int64, device=device),
            block_tables=make_block_table_tensor([list(c.block_table) for c in chunks], device),
            context_lens=torch.tensor(
                [c.num_cached + len(c.token_ids) for c in chunks], dtype=torch.int32, device=device
            ),
            cu_seqlens_q=cu_seqlens,
            max_query_len=max(len(c.token_ids) for c in chunks),
            max_context_len=max(c.num_cached + len(c.token_ids) for c in chunks),
        )
        hidden = self.model(
            torch.tensor(input_ids, dtype=torch.int64, device=device),
            torch.tensor(positions, dtype=torch.int64, device=device),
            meta,
            self.pool,
        )
        if not all_logits:
            hidden = hidden[cu_seqlens[1:].long() - 1]  # last new token of each sequence
        return self.model.compute_logits(hidden)

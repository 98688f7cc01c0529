"""One forward pass over a batch of sequences that each add new tokens on top of what the pool already holds.

Prefill (many new tokens), chunked prefill (new tokens after a cached prefix) and decode (one new token each) are
the same call; a batch where every sequence adds exactly one token takes the decode attention kernel. `decode` is
the decode worker's step: its input ids may stay on the device, and queueing it does not wait for the device.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from kvstore.block_table import make_block_table_tensor, slot_mapping
from kvstore.pool import KVPool
from services.model.attention_metadata import AttentionMetadata
from services.model.llama import LlamaForCausalLM
from services.model.transfer import to_device


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
        self.prefill_graphs = None

    def enable_cuda_graphs(self, max_batch: int, max_context_len: int) -> None:
        """Capture decode steps for batch-size buckets up to max_batch (GPU only; the CPU path stays eager)."""
        from services.model.cuda_graphs import DecodeGraphs

        if self.device.type != "cuda":
            return
        self.graphs = DecodeGraphs(self.model, self.pool, max_batch, max_context_len)
        self.graphs.capture()

    def enable_prefill_graphs(self, max_tokens: int, max_context_len: int) -> None:
        """Capture one-sequence prefill chunks of up to max_tokens new tokens (GPU only; 0 turns them off)."""
        from services.model.prefill_graphs import PrefillGraphs

        if self.device.type != "cuda" or max_tokens <= 0:
            return
        graphs = PrefillGraphs(self.model, self.pool, max_tokens, max_context_len)
        if graphs.buckets:
            graphs.capture()
            self.prefill_graphs = graphs

    @torch.inference_mode()
    def forward(self, chunks: list[SeqChunk], all_logits: bool = False) -> torch.Tensor:
        """Logits [num_seqs, vocab] for each sequence's last new token, or [num_tokens, vocab] with all_logits."""
        is_decode = all(len(c.token_ids) == 1 for c in chunks)
        if self.graphs is not None and is_decode and not all_logits and self.graphs.bucket(len(chunks)):
            return self.decode(
                [c.token_ids[0] for c in chunks], [c.num_cached for c in chunks], [c.block_table for c in chunks]
            )
        if self.prefill_graphs is not None and len(chunks) == 1 and not all_logits:
            c = chunks[0]
            end = c.num_cached + len(c.token_ids)
            if self.prefill_graphs.bucket(len(c.token_ids)) and len(c.block_table) <= self.prefill_graphs.max_blocks:
                slots = slot_mapping(list(c.block_table), c.num_cached, end, self.block_size)  # checks the table
                return self.prefill_graphs.replay(c.token_ids, c.num_cached, slots, c.block_table)
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

    @torch.inference_mode()
    def decode(
        self,
        token_ids: Sequence[int] | torch.Tensor,  # [num_seqs]: host ints, or int64 on the device
        num_cached: Sequence[int],  # [num_seqs]: the position each sequence's token is written at
        block_tables: Sequence[Sequence[int]],  # [num_seqs][blocks], covering num_cached + 1 tokens
    ) -> torch.Tensor:
        """Logits [num_seqs, vocab] of a decode step: each sequence adds one token after its num_cached.

        Device token ids (the previous step's sampled ids, rows in the same order) are read in stream order, so this
        step can be queued before the host has seen them. Inputs go over as non-blocking copies from pinned memory,
        so queueing the step does not wait for the steps before it.
        """
        size = self.block_size
        slots = []
        for n, table in zip(num_cached, block_tables, strict=True):
            if len(table) * size <= n:
                raise ValueError(f"block table covers {len(table) * size} tokens; position {n} is past it")
            slots.append(table[n // size] * size + n % size)
        if self.graphs is not None and self.graphs.bucket(len(slots)):
            return self.graphs.replay_step(token_ids, num_cached, slots, block_tables)
        device = self.device
        if not isinstance(token_ids, torch.Tensor):
            token_ids = to_device(list(token_ids), torch.int64, device)
        tables = make_block_table_tensor([list(t) for t in block_tables], "cpu")
        meta = AttentionMetadata(
            is_prefill=False,
            slot_mapping=to_device(slots, torch.int64, device),
            block_tables=to_device(tables, torch.int32, device),
            context_lens=to_device([n + 1 for n in num_cached], torch.int32, device),
            max_context_len=max(num_cached) + 1,
        )
        hidden = self.model(token_ids, to_device(list(num_cached), torch.int64, device), meta, self.pool)
        return self.model.compute_logits(hidden)

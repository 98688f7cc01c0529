"""CUDA (HIP) graphs for decode steps, one per batch-size bucket.

A decode step of a small batch is dozens of tiny kernels per layer; replaying a captured graph removes the launch
overhead that otherwise dominates. The graph reads its inputs from static buffers, so a step copies the batch's
token ids, positions, slots, block tables and context lengths in, replays, and reads the logits out. Rows past the
real batch are padding: slot -1 (store_kv skips it) and context length 1 (a finite, ignored output).
"""

from __future__ import annotations

import torch

from services.model.attention_metadata import AttentionMetadata

BUCKETS = (1, 2, 4, 8, 16, 24, 32, 48, 64, 96, 128, 160, 192, 256)


class DecodeGraphs:
    def __init__(self, model, pool, max_batch: int, max_context_len: int) -> None:
        self.model, self.pool = model, pool
        device = model.lm_head.weight.device
        self.buckets = [b for b in BUCKETS if b <= max_batch] or [max_batch]
        n = self.buckets[-1]
        self.max_blocks = -(-max_context_len // pool.geometry.block_size)
        self.max_context_len = max_context_len
        self.input_ids = torch.zeros(n, dtype=torch.int64, device=device)
        self.positions = torch.zeros(n, dtype=torch.int64, device=device)
        self.slots = torch.full((n,), -1, dtype=torch.int64, device=device)
        self.block_tables = torch.zeros(n, self.max_blocks, dtype=torch.int32, device=device)
        self.context_lens = torch.ones(n, dtype=torch.int32, device=device)
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self.outputs: dict[int, torch.Tensor] = {}
        self.pool_handle = None

    def _meta(self, bs: int) -> AttentionMetadata:
        return AttentionMetadata(
            is_prefill=False,
            slot_mapping=self.slots[:bs],
            block_tables=self.block_tables[:bs],
            context_lens=self.context_lens[:bs],
            max_context_len=self.max_context_len,
        )

    def _run(self, bs: int) -> torch.Tensor:
        hidden = self.model(self.input_ids[:bs], self.positions[:bs], self._meta(bs), self.pool)
        return self.model.compute_logits(hidden)

    @torch.inference_mode()
    def capture(self) -> None:
        """Largest bucket first, so smaller graphs reuse its memory pool."""
        for bs in reversed(self.buckets):
            self._run(bs)  # warm-up: Triton compiles, cuBLAS picks algorithms, outside the capture
            torch.cuda.synchronize()
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=self.pool_handle):
                self.outputs[bs] = self._run(bs)
            self.pool_handle = graph.pool()
            self.graphs[bs] = graph
        torch.cuda.synchronize()

    def bucket(self, bs: int) -> int | None:
        return next((b for b in self.buckets if b >= bs), None)

    @torch.inference_mode()
    def replay(self, input_ids, positions, slots, block_tables, context_lens) -> torch.Tensor:
        """Inputs are device tensors of the real batch; returns logits [bs, vocab] (a view into a static output)."""
        bs = input_ids.shape[0]
        b = self.bucket(bs)
        self.input_ids[:bs].copy_(input_ids)
        self.positions[:bs].copy_(positions)
        self.slots[:bs].copy_(slots)
        self.slots[bs:b].fill_(-1)
        self.block_tables[:bs, : block_tables.shape[1]].copy_(block_tables)
        self.context_lens[:bs].copy_(context_lens)
        self.context_lens[bs:b].fill_(1)
        self.graphs[b].replay()
        return self.outputs[b][:bs]

"""CUDA (HIP) graphs for short prefill chunks of one sequence: a multi-turn chat's next turn, a short prompt.

A chunk of tens of new tokens over a long cached prefix is launch-bound when run eagerly: ~10 kernels a layer, each
launched from Python, take longer on the host than on the GPU (H200, 8B shape: the forward of 65 new tokens over 5k
cached ones took 18.7 ms eagerly against ~8 ms of GPU work). One graph per token-count bucket replays the whole
forward from static inputs instead.

A chunk of T new tokens runs in the smallest bucket >= T. Rows T.. are padding: token 0 at position 0, slot -1
(store_kv skips it), outside cu_seqlens_q = [0, T] (attention leaves them unwritten). Every other layer works row by
row, so padding rows never touch the real ones; the logits come from row T - 1 only, picked on the device.
"""

from __future__ import annotations

import torch

from services.model.attention_metadata import AttentionMetadata
from services.model.cuda_graphs import capture_buckets, smallest_bucket

BUCKETS = (16, 32, 64, 128, 256)


class PrefillGraphs:
    def __init__(self, model, pool, max_tokens: int, max_context_len: int) -> None:
        self.model, self.pool = model, pool
        device = model.lm_head.weight.device
        self.buckets = [b for b in BUCKETS if b <= max_tokens]
        n = self.buckets[-1] if self.buckets else 0
        self.max_blocks = -(-max_context_len // pool.geometry.block_size)
        self.max_context_len = max_context_len
        # int64 rows: input ids, positions, slots. int32: cu_seqlens_q (2), context length, last row, block table.
        self.i64 = torch.zeros(3, n, dtype=torch.int64, device=device)
        self.i32 = torch.zeros(4 + self.max_blocks, dtype=torch.int32, device=device)
        # Without a GPU (tests) the same buffers and padding run eagerly: nothing is captured, nothing pinned.
        on_gpu = device.type == "cuda"
        self.host_i64 = torch.zeros(3, n, dtype=torch.int64, pin_memory=on_gpu)
        self.host_i32 = torch.zeros(4 + self.max_blocks, dtype=torch.int32, pin_memory=on_gpu)
        self.copied = torch.cuda.Event() if on_gpu else None  # the device has read the host mirrors
        self.i64[2].fill_(-1)
        self.i32[2] = 1
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self.outputs: dict[int, torch.Tensor] = {}

    def _run(self, t: int) -> torch.Tensor:
        meta = AttentionMetadata(
            is_prefill=True,
            slot_mapping=self.i64[2, :t],
            block_tables=self.i32[4:].view(1, self.max_blocks),
            context_lens=self.i32[2:3],
            cu_seqlens_q=self.i32[0:2],
            max_query_len=t,
            max_context_len=self.max_context_len,
        )
        hidden = self.model(self.i64[0, :t], self.i64[1, :t], meta, self.pool)
        return self.model.compute_logits(hidden.index_select(0, self.i32[3:4]))

    @torch.inference_mode()
    def capture(self) -> None:
        self.graphs, self.outputs = capture_buckets(self.buckets, self._run)

    def bucket(self, num_tokens: int) -> int | None:
        return smallest_bucket(self.buckets, num_tokens)

    @torch.inference_mode()
    def replay(self, token_ids, num_cached: int, slots, block_table) -> torch.Tensor:
        """Logits [1, vocab] of the chunk's last token (a view into a static output, valid until the next replay)."""
        t = len(token_ids)
        b = self.bucket(t)
        if b is None or len(block_table) > self.max_blocks:
            raise ValueError(f"a chunk of {t} tokens over {len(block_table)} blocks does not fit the prefill graphs")
        if self.copied is not None:
            self.copied.synchronize()
        ids, pos, slot = self.host_i64[:, :b]
        ids[:t] = torch.as_tensor(token_ids, dtype=torch.int64)
        ids[t:] = 0
        pos[:t] = torch.arange(num_cached, num_cached + t)
        pos[t:] = 0
        slot[:t] = torch.as_tensor(slots, dtype=torch.int64)
        slot[t:] = -1
        self.host_i32[:4] = torch.tensor([0, t, num_cached + t, t - 1], dtype=torch.int32)
        self.host_i32[4 : 4 + len(block_table)] = torch.as_tensor(block_table, dtype=torch.int32)
        self.i64[:, :b].copy_(self.host_i64[:, :b], non_blocking=True)
        self.i32[: 4 + len(block_table)].copy_(self.host_i32[: 4 + len(block_table)], non_blocking=True)
        if self.copied is None:
            return self._run(b)  # not captured (no GPU): the same padded forward, eagerly
        self.copied.record()
        self.graphs[b].replay()
        return self.outputs[b]

"""CUDA (HIP) graphs for decode steps, one per batch-size bucket.

A decode step of a small batch is dozens of tiny kernels per layer; replaying a captured graph removes the launch
overhead that otherwise dominates. The graph reads its inputs from static buffers, so a step copies the batch's
token ids, positions, slots, block tables and context lengths in, replays, and reads the logits out. Rows past the
real batch are padding: slot -1 (store_kv skips it) and context length 1 (a finite, ignored output).

Every static input lives in one device buffer, laid out like a pinned host mirror, so `replay_step` moves a step's
inputs with a single non-blocking copy (two when the token ids come from the previous step on the device): no
stream sync, and the host is free to prepare the next step while this one runs.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from services.model.attention_metadata import AttentionMetadata

BUCKETS = (1, 2, 4, 8, 16, 24, 32, 48, 64, 96, 128, 160, 192, 256)


def capture_buckets(buckets, run) -> tuple[dict[int, torch.cuda.CUDAGraph], dict[int, torch.Tensor]]:
    """One graph of run(b) per bucket b, largest first so that the smaller ones reuse its memory pool: returns
    ({bucket: graph}, {bucket: its static output})."""
    graphs, outputs, pool = {}, {}, None
    for b in sorted(buckets, reverse=True):
        run(b)  # warm-up: Triton compiles, cuBLAS picks algorithms, outside the capture
        torch.cuda.synchronize()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=pool):
            outputs[b] = run(b)
        pool = graph.pool()
        graphs[b] = graph
    torch.cuda.synchronize()
    return graphs, outputs


def smallest_bucket(buckets, n: int) -> int | None:
    """The first bucket (ascending) that holds n, or None."""
    return next((b for b in buckets if b >= n), None)


class InputLayout:
    """Byte layout of the graph inputs: int64 input_ids, positions, slots, then int32 context_lens and block_tables
    [n, max_blocks]. Each section starts 256-byte aligned, like a tensor of its own. Block tables come last so that
    a batch of bs rows needs only the bytes up to row bs."""

    def __init__(self, n: int, max_blocks: int) -> None:
        self.n, self.max_blocks = n, max_blocks
        self.stride = -(-n // 64) * 64  # elements per 1-D section
        self.int32_start = 3 * self.stride * 8
        self.nbytes = self.end(n)

    def views(self, buf):
        """(input_ids, positions, slots, context_lens, block_tables) over a uint8 tensor or numpy array."""
        n, m, stride = self.n, self.max_blocks, self.stride
        is_tensor = isinstance(buf, torch.Tensor)
        i64 = buf[: self.int32_start].view(torch.int64 if is_tensor else np.int64).reshape(3, stride)
        i32 = buf[self.int32_start :].view(torch.int32 if is_tensor else np.int32)
        return i64[0, :n], i64[1, :n], i64[2, :n], i32[:n], i32[stride:].reshape(n, m)

    def ids_end(self) -> int:
        return self.stride * 8

    def end(self, bs: int) -> int:
        """Bytes up to the end of row bs of the block tables."""
        return self.int32_start + (self.stride + bs * self.max_blocks) * 4


class HostInputs:
    """A pinned host mirror of the device input buffer. `copied` marks when the device has read it: the copy is
    asynchronous, so the host must not rewrite the mirror before that."""

    def __init__(self, layout: InputLayout, pin: bool = True) -> None:
        self.layout = layout
        self.buffer = torch.zeros(layout.nbytes, dtype=torch.uint8, pin_memory=pin)
        self.input_ids, self.positions, self.slots, self.context_lens, self.block_tables = layout.views(
            self.buffer.numpy()
        )
        self.slots[:] = -1
        self.context_lens[:] = 1
        self.copied = torch.cuda.Event() if pin else None

    def write(
        self,
        token_ids: Sequence[int] | None,  # None: the ids come from the device, this section is not copied
        positions: Sequence[int],
        slots: Sequence[int],
        block_tables: Sequence[Sequence[int]],
    ) -> tuple[int, int]:
        """Fills the mirror for a batch (padding rows: slot -1, context length 1); returns the byte range to copy."""
        bs = len(positions)
        if token_ids is not None:
            self.input_ids[:bs] = token_ids
        self.positions[:bs] = positions
        self.slots[:bs] = slots
        self.slots[bs:] = -1
        self.context_lens[:bs] = self.positions[:bs] + 1
        self.context_lens[bs:] = 1
        for row, table in enumerate(block_tables):
            if len(table) > self.layout.max_blocks:
                raise ValueError(f"a block table has {len(table)} blocks; graphs hold {self.layout.max_blocks}")
            # columns past the table keep stale ids: never read, the kernels stop at context_lens
            self.block_tables[row, : len(table)] = table
        start = 0 if token_ids is not None else self.layout.ids_end()
        return start, self.layout.end(bs)


class DecodeGraphs:
    def __init__(self, model, pool, max_batch: int, max_context_len: int) -> None:
        self.model, self.pool = model, pool
        device = model.lm_head.weight.device
        self.buckets = [b for b in BUCKETS if b <= max_batch] or [max_batch]
        n = self.buckets[-1]
        self.max_blocks = -(-max_context_len // pool.geometry.block_size)
        self.max_context_len = max_context_len
        self.layout = InputLayout(n, self.max_blocks)
        self.inputs = torch.zeros(self.layout.nbytes, dtype=torch.uint8, device=device)
        self.input_ids, self.positions, self.slots, self.context_lens, self.block_tables = self.layout.views(
            self.inputs
        )
        self.slots.fill_(-1)
        self.context_lens.fill_(1)
        # Two mirrors: step n+1 is written while step n's copy may still wait in the stream behind step n-1.
        self.host = [HostInputs(self.layout), HostInputs(self.layout)]
        self.next_host = 0
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self.outputs: dict[int, torch.Tensor] = {}

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
        self.graphs, self.outputs = capture_buckets(self.buckets, self._run)

    def bucket(self, bs: int) -> int | None:
        return smallest_bucket(self.buckets, bs)

    @torch.inference_mode()
    def replay_step(
        self,
        token_ids: Sequence[int] | torch.Tensor,  # [bs]: host ints, or int64 on the device (read in stream order)
        positions: Sequence[int],  # [bs]
        slots: Sequence[int],  # [bs]
        block_tables: Sequence[Sequence[int]],  # [bs][blocks]
    ) -> torch.Tensor:
        """One decode step from host-side metadata; returns logits [bs, vocab] (a view into a static output)."""
        bs = len(positions)
        host = self.host[self.next_host]
        self.next_host ^= 1
        host.copied.synchronize()  # at once in practice: that copy was queued before a step the host has waited for
        on_device = isinstance(token_ids, torch.Tensor)
        start, end = host.write(None if on_device else token_ids, positions, slots, block_tables)
        self.inputs[start:end].copy_(host.buffer[start:end], non_blocking=True)
        host.copied.record()
        if on_device:
            self.input_ids[:bs].copy_(token_ids)
        b = self.bucket(bs)
        self.graphs[b].replay()
        return self.outputs[b][:bs]

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

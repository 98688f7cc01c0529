"""Block tables and slot mappings: how a sequence's token positions map onto pool blocks.

A sequence's block table lists its block ids in order; position p lives in block block_table[p // block_size] at
offset p % block_size. Its slot, the flat row index into a layer's cache viewed as
[num_blocks * block_size, num_kv_heads, head_dim], is block_id * block_size + offset.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

# Padding value of block tables. Padded entries are never read (kernels stop at context_lens), so any valid id works;
# 0 keeps a stray read inside the pool.
BLOCK_TABLE_PAD = 0


def blocks_needed(num_tokens: int, block_size: int) -> int:
    """Blocks that hold num_tokens tokens (ceil division)."""
    if num_tokens < 0 or block_size <= 0:
        raise ValueError(f"bad blocks_needed({num_tokens}, {block_size})")
    return -(-num_tokens // block_size)


def slot_mapping(block_table: list[int], start: int, end: int, block_size: int) -> list[int]:
    """Slots of positions start..end-1 of a sequence, for store_kv."""
    if not 0 <= start <= end:
        raise ValueError(f"bad position range [{start}, {end})")
    if end > len(block_table) * block_size:
        raise ValueError(
            f"positions up to {end} need {blocks_needed(end, block_size)} blocks, block_table has {len(block_table)}"
        )
    return [block_table[p // block_size] * block_size + p % block_size for p in range(start, end)]


def make_block_table_tensor(
    tables: list[list[int]], device: torch.device | str, max_blocks: int | None = None
) -> torch.Tensor:
    """Batch block tables into [num_seqs, max_blocks] int32, padded with BLOCK_TABLE_PAD.

    max_blocks defaults to the longest table (at least 1, so the tensor always has a column); pass a fixed width to
    keep shapes stable (CUDA graphs).
    """
    import torch  # here, not at the top: blocks_needed serves the torch-free scheduler (services/scheduler.py)

    longest = max((len(t) for t in tables), default=0)
    width = max(longest, 1) if max_blocks is None else max_blocks
    if longest > width:
        raise ValueError(f"a block table has {longest} blocks, more than max_blocks={width}")
    rows = [t + [BLOCK_TABLE_PAD] * (width - len(t)) for t in tables]
    # Built on the host then copied once: one transfer instead of one per sequence.
    out = torch.tensor(rows, dtype=torch.int32) if rows else torch.empty((0, width), dtype=torch.int32)
    return out.to(device)

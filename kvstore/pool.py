"""The KV block pool: one byte buffer, allocated once, with the K/V caches and their scales carved out of it.

One allocation because it is shared whole between processes (a CUDA/HIP IPC handle or a /dev/shm file covers an
entire allocation; sub-allocations cannot be exported on their own). Every process that maps the buffer rebuilds the
same views with `KVPool.from_buffer`, so block id b means the same memory everywhere.

Layout of the buffer, each region starting at a multiple of ALIGNMENT bytes (as stored, row-major):

    k_cache  [num_layers, num_blocks, block_size, num_kv_heads, head_dim]  spec.k.storage_dtype
    v_cache  [num_layers, num_blocks, num_kv_heads, head_dim, block_size]  spec.v.storage_dtype   (token-major)
    k_scale  [num_layers, num_blocks, block_size, num_kv_heads]            float32, only if spec.k is quantized
    v_scale  [num_layers, num_blocks, block_size, num_kv_heads]            float32, only if spec.v is quantized

Every view is indexed the same way, [layer, block, slot, head, channel] (scales without the channel): v_cache is a
permuted, non-contiguous view of its region, so the readers and writers that go through strides (the references'
indexing, the Triton kernels) need not know the storage order; code that flattens a cache with `.view` must not
assume it is contiguous.

Why V is stored token-major, the block's tokens innermost: attention computes P @ V, whose reduction runs over
tokens, and the tensor cores take their B operand with the reduction dimension contiguous. Stored [token, channel]
(like K, whose Q @ K^T reduces over channels), an 8-bit V tile reached the tensor cores through byte-wise shared-memory
loads (int8 decode attention at 0.70 of copy bandwidth on an H200, bf16 at 0.96); stored [channel, token], each
(head, channel) row of a block is block_size contiguous tokens and V loads like K. vLLM's original paged attention
stored V the same way. One layout for every format: 16-bit V reads as well either way (the tensor cores' shared-memory
loads can transpose 16-bit values, not 8-bit ones). The price is in store_kv: one new token's V is written as
scattered elements (block_size apart) instead of contiguous rows.

K and V are separate tensors (not one [.., 2, ..] tensor) because their formats (and layouts) differ. Scales of
unscaled formats (bf16/fp16/fp32) are None rather than a tensor of ones: no memory spent, and a kernel cannot read a
meaningless scale by mistake.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from kvstore.formats import SCALE_DTYPE, KVFormat, KVSpec, bytes_per_token, dequantize

# Region starts are aligned so that every view is aligned for vector loads of any width a kernel may use.
ALIGNMENT = 256


@dataclass(frozen=True)
class PoolGeometry:
    """The shape of a pool; with a KVSpec it fixes the buffer layout."""

    num_layers: int
    num_blocks: int
    block_size: int
    num_kv_heads: int
    head_dim: int

    def __post_init__(self) -> None:
        for name in ("num_layers", "num_blocks", "block_size", "num_kv_heads", "head_dim"):
            if getattr(self, name) <= 0:
                raise ValueError(f"PoolGeometry.{name} must be positive, got {getattr(self, name)}")

    @property
    def cache_shape(self) -> tuple[int, int, int, int, int]:
        return (self.num_layers, self.num_blocks, self.block_size, self.num_kv_heads, self.head_dim)

    @property
    def scale_shape(self) -> tuple[int, int, int, int]:
        return (self.num_layers, self.num_blocks, self.block_size, self.num_kv_heads)


@dataclass(frozen=True)
class _Region:
    offset: int
    shape: tuple[int, ...]  # as stored, row-major
    dtype: torch.dtype
    dims: tuple[int, ...] | None = None  # the view is the stored tensor permuted by dims; None: as stored

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * self.dtype.itemsize


def _align(n: int) -> int:
    return (n + ALIGNMENT - 1) // ALIGNMENT * ALIGNMENT


def _layout(geometry: PoolGeometry, spec: KVSpec) -> tuple[dict[str, _Region], int]:
    """Region of each view and the total byte size; the one place the layout is decided (see the module docstring)."""
    g = geometry
    # V stored [num_layers, num_blocks, num_kv_heads, head_dim, block_size]; viewed as cache_shape through `dims`.
    v_stored = (g.num_layers, g.num_blocks, g.num_kv_heads, g.head_dim, g.block_size)
    wanted: list[tuple[str, tuple[int, ...], torch.dtype, tuple[int, ...] | None]] = [
        ("k_cache", g.cache_shape, spec.k.storage_dtype, None),
        ("v_cache", v_stored, spec.v.storage_dtype, (0, 1, 4, 2, 3)),
    ]
    if spec.k.has_scale:
        wanted.append(("k_scale", g.scale_shape, SCALE_DTYPE, None))
    if spec.v.has_scale:
        wanted.append(("v_scale", g.scale_shape, SCALE_DTYPE, None))
    regions: dict[str, _Region] = {}
    offset = 0
    for name, shape, dtype, dims in wanted:
        region = _Region(offset=offset, shape=shape, dtype=dtype, dims=dims)
        regions[name] = region
        offset = _align(offset + region.nbytes)
    return regions, offset


def _view(buffer: torch.Tensor, region: _Region) -> torch.Tensor:
    stored = buffer[region.offset : region.offset + region.nbytes].view(region.dtype).view(region.shape)
    return stored if region.dims is None else stored.permute(region.dims)


@dataclass(frozen=True)
class LayerKV:
    """One layer's views into the pool, plus the formats needed to read them. What kernels take."""

    k_cache: torch.Tensor  # [num_blocks, block_size, num_kv_heads, head_dim] in k_format.storage_dtype
    # [num_blocks, block_size, num_kv_heads, head_dim] in v_format.storage_dtype; stored token-major (non-contiguous)
    v_cache: torch.Tensor
    k_scale: torch.Tensor | None  # [num_blocks, block_size, num_kv_heads] float32; None if k_format is unscaled
    v_scale: torch.Tensor | None  # [num_blocks, block_size, num_kv_heads] float32; None if v_format is unscaled
    k_format: KVFormat
    v_format: KVFormat

    @property
    def num_blocks(self) -> int:
        return self.k_cache.shape[0]

    @property
    def block_size(self) -> int:
        return self.k_cache.shape[1]

    @property
    def num_kv_heads(self) -> int:
        return self.k_cache.shape[2]

    @property
    def head_dim(self) -> int:
        return self.k_cache.shape[3]

    @property
    def v_token_run(self) -> int:
        """How many consecutive tokens of one V (head, channel) lie next to each other in memory, every such run
        starting at an element offset that is a multiple of its length: block_size for the pool's token-major V,
        1 for V stored [token, channel]. Kernels use it to load V in vectors across tokens."""
        block, slot, head, channel = self.v_cache.stride()
        if slot == 1 and all(stride % self.block_size == 0 for stride in (block, head, channel)):
            return self.block_size
        return 1

    def gather(
        self, block_table: torch.Tensor, num_tokens: int, dtype: torch.dtype = torch.float32
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Dequantized, contiguous K and V of one sequence's first `num_tokens` tokens.

        block_table: [>= ceil(num_tokens / block_size)] block ids of the sequence, in order.
        Returns (k, v), each [num_tokens, num_kv_heads, head_dim] in `dtype`.
        """
        num_blocks = -(-num_tokens // self.block_size)
        blocks = block_table[:num_blocks].long()
        # [num_blocks, block_size, ...] -> [num_blocks * block_size, ...] -> first num_tokens rows
        k = self.k_cache[blocks].flatten(0, 1)[:num_tokens]
        v = self.v_cache[blocks].flatten(0, 1)[:num_tokens]
        k_scale = None if self.k_scale is None else self.k_scale[blocks].flatten(0, 1)[:num_tokens]
        v_scale = None if self.v_scale is None else self.v_scale[blocks].flatten(0, 1)[:num_tokens]
        return dequantize(k, k_scale, self.k_format, dtype), dequantize(v, v_scale, self.v_format, dtype)


@dataclass(frozen=True)
class KVPool:
    """The whole pool: the byte buffer and the views carved out of it. Build with `allocate` or `from_buffer`."""

    geometry: PoolGeometry
    spec: KVSpec
    buffer: torch.Tensor  # [nbytes(geometry, spec)] uint8; the one allocation that is shared
    k_cache: torch.Tensor  # [num_layers, num_blocks, block_size, num_kv_heads, head_dim]
    v_cache: torch.Tensor  # [num_layers, num_blocks, block_size, num_kv_heads, head_dim]; stored token-major
    k_scale: torch.Tensor | None  # [num_layers, num_blocks, block_size, num_kv_heads] float32, or None (unscaled K)
    v_scale: torch.Tensor | None  # [num_layers, num_blocks, block_size, num_kv_heads] float32, or None (unscaled V)

    @staticmethod
    def nbytes(geometry: PoolGeometry, spec: KVSpec) -> int:
        """Size of the buffer a pool of this geometry and spec needs (including alignment padding)."""
        return _layout(geometry, spec)[1]

    @classmethod
    def allocate(cls, geometry: PoolGeometry, spec: KVSpec, device: torch.device | str) -> KVPool:
        """Allocate a fresh, zeroed buffer. Zeroed so unwritten slots dequantize to 0, never NaN."""
        buffer = torch.zeros(cls.nbytes(geometry, spec), dtype=torch.uint8, device=device)
        return cls.from_buffer(geometry, spec, buffer)

    @classmethod
    def from_buffer(cls, geometry: PoolGeometry, spec: KVSpec, buffer: torch.Tensor) -> KVPool:
        """Carve the views out of an existing buffer (e.g. one mapped from another process). Shares its memory."""
        regions, total = _layout(geometry, spec)
        if buffer.dtype != torch.uint8 or buffer.dim() != 1 or not buffer.is_contiguous():
            raise ValueError(
                f"pool buffer must be a contiguous 1-D uint8 tensor, got {buffer.dtype} {tuple(buffer.shape)}"
            )
        if buffer.numel() < total:
            raise ValueError(f"pool buffer holds {buffer.numel()} bytes, geometry and spec {spec} need {total}")
        views = {name: _view(buffer, region) for name, region in regions.items()}
        return cls(
            geometry=geometry,
            spec=spec,
            buffer=buffer,
            k_cache=views["k_cache"],
            v_cache=views["v_cache"],
            k_scale=views.get("k_scale"),
            v_scale=views.get("v_scale"),
        )

    @property
    def bytes_per_block(self) -> int:
        """Bytes one block id holds over all layers: K, V and scales (alignment padding not included)."""
        g = self.geometry
        return g.block_size * bytes_per_token(self.spec, g.num_layers, g.num_kv_heads, g.head_dim)

    def layer(self, i: int) -> LayerKV:
        if not 0 <= i < self.geometry.num_layers:
            raise IndexError(f"layer {i} out of range for a pool of {self.geometry.num_layers} layers")
        return LayerKV(
            k_cache=self.k_cache[i],
            v_cache=self.v_cache[i],
            k_scale=None if self.k_scale is None else self.k_scale[i],
            v_scale=None if self.v_scale is None else self.v_scale[i],
            k_format=self.spec.k,
            v_format=self.spec.v,
        )

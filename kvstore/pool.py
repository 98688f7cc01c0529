"""The KV block pool: one byte buffer, allocated once, with the K/V caches and their scales carved out of it.

One allocation because it is shared whole between processes (a CUDA/HIP IPC handle or a /dev/shm file covers an
entire allocation; sub-allocations cannot be exported on their own). Every process that maps the buffer rebuilds the
same views with `KVPool.from_buffer`, so block id b means the same memory everywhere.

Layout of the buffer, each region starting at a multiple of ALIGNMENT bytes:

    k_cache  [num_layers, num_blocks, block_size, num_kv_heads, head_dim]  spec.k.storage_dtype
    v_cache  [num_layers, num_blocks, block_size, num_kv_heads, head_dim]  spec.v.storage_dtype
    k_scale  [num_layers, num_blocks, block_size, num_kv_heads]            float32, only if spec.k is quantized
    v_scale  [num_layers, num_blocks, block_size, num_kv_heads]            float32, only if spec.v is quantized

K and V are separate tensors (not one [.., 2, ..] tensor) because their formats may differ. Scales of unscaled
formats (bf16/fp16/fp32) are None rather than a tensor of ones: no memory spent, and a kernel cannot read a
meaningless scale by mistake.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from kvstore.formats import SCALE_DTYPE, KVFormat, KVSpec, LayerKV, bytes_per_token

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
    shape: tuple[int, ...]
    dtype: torch.dtype

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * self.dtype.itemsize


def _align(n: int) -> int:
    return (n + ALIGNMENT - 1) // ALIGNMENT * ALIGNMENT


def _storage(fmt: KVFormat, fp8: torch.dtype | None) -> torch.dtype:
    return fp8 if fp8 is not None and fmt is KVFormat.FP8 else fmt.storage_dtype


def _layout(geometry: PoolGeometry, spec: KVSpec, fp8: torch.dtype | None = None) -> tuple[dict[str, _Region], int]:
    """Region of each view and the total byte size; the one place the layout is decided. fp8: the e4m3 flavour of
    fp8 K/V, default this platform's (kvstore/formats.py `fp8_dtype`); both are 1 byte, the layout is the same."""
    wanted: list[tuple[str, tuple[int, ...], torch.dtype]] = [
        ("k_cache", geometry.cache_shape, _storage(spec.k, fp8)),
        ("v_cache", geometry.cache_shape, _storage(spec.v, fp8)),
    ]
    if spec.k.has_scale:
        wanted.append(("k_scale", geometry.scale_shape, SCALE_DTYPE))
    if spec.v.has_scale:
        wanted.append(("v_scale", geometry.scale_shape, SCALE_DTYPE))
    regions: dict[str, _Region] = {}
    offset = 0
    for name, shape, dtype in wanted:
        region = _Region(offset=offset, shape=shape, dtype=dtype)
        regions[name] = region
        offset = _align(offset + region.nbytes)
    return regions, offset


def _view(buffer: torch.Tensor, region: _Region) -> torch.Tensor:
    return buffer[region.offset : region.offset + region.nbytes].view(region.dtype).view(region.shape)


@dataclass(frozen=True)
class KVPool:
    """The whole pool: the byte buffer and the views carved out of it. Build with `allocate` or `from_buffer`."""

    geometry: PoolGeometry
    spec: KVSpec
    buffer: torch.Tensor  # [nbytes(geometry, spec)] uint8; the one allocation that is shared
    k_cache: torch.Tensor  # [num_layers, num_blocks, block_size, num_kv_heads, head_dim]
    v_cache: torch.Tensor  # [num_layers, num_blocks, block_size, num_kv_heads, head_dim]
    k_scale: torch.Tensor | None  # [num_layers, num_blocks, block_size, num_kv_heads] float32, or None (unscaled K)
    v_scale: torch.Tensor | None  # [num_layers, num_blocks, block_size, num_kv_heads] float32, or None (unscaled V)

    @staticmethod
    def nbytes(geometry: PoolGeometry, spec: KVSpec) -> int:
        """Size of the buffer a pool of this geometry and spec needs (including alignment padding)."""
        return _layout(geometry, spec)[1]

    @classmethod
    def allocate(cls, geometry: PoolGeometry, spec: KVSpec, device: torch.device | str,
                 fp8: torch.dtype | None = None) -> KVPool:  # fmt: skip
        """Allocate a fresh, zeroed buffer. Zeroed so unwritten slots dequantize to 0, never NaN (the zero byte is +0.0
        in e4m3fn and e4m3fnuz alike). fp8: force the e4m3 flavour of fp8 K/V (tests and the MI300X quality row on the
        CPU: torch.float8_e4m3fnuz), default this platform's."""
        buffer = torch.zeros(cls.nbytes(geometry, spec), dtype=torch.uint8, device=device)
        return cls.from_buffer(geometry, spec, buffer, fp8)

    @classmethod
    def from_buffer(cls, geometry: PoolGeometry, spec: KVSpec, buffer: torch.Tensor,
                    fp8: torch.dtype | None = None) -> KVPool:  # fmt: skip
        """Carve the views out of an existing buffer (e.g. one mapped from another process). Shares its memory. fp8:
        as in `allocate`."""
        regions, total = _layout(geometry, spec, fp8)
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

"""KV cache formats: how K and V are stored in the pool, and the quantize/dequantize pair that defines them.

A format is chosen per pool, for K and V separately (`k=int8,v=bf16` is the asymmetric scheme: keys tolerate
int8 well, values carry the output directly). Quantized formats store one float32 scale per token and head, so a
token's block can be read back on its own: scales travel with the blocks and a handoff is block ids only.

This module is the single definition of the quantization math; the store_kv kernels (torch reference and Triton)
must produce exactly what `quantize` produces.
"""

from __future__ import annotations

import enum
import functools
from dataclasses import dataclass

import torch

# int8 is symmetric and uses [-127, 127]; -128 is left out so that the range is symmetric around 0.
INT8_MAX = 127.0

# A token-head whose values are all (near) zero would get scale 0 and divide by zero. Clamping amax keeps the scale a
# normal float32 (no denormals, which GPUs may flush to zero); such a token-head then quantizes to zeros, exactly.
AMAX_FLOOR = 1e-8


# GPU architectures whose fp8 is e4m3fnuz (no negative zero, NaN 0x80, bias 8, max 240): CDNA3, the MI300 series. CDNA4
# (gfx950, MI350X) converts OCP e4m3fn (max 448) in hardware, as NVIDIA does (AMD's CDNA4 ISA guide; Triton 3.6 asserts
# converting float32 to e4m3fnuz for gfx950).
FP8_E4M3FNUZ_ARCHS = frozenset({"gfx940", "gfx941", "gfx942"})


def fp8_dtype_for_arch(arch: str | None) -> torch.dtype:
    """The e4m3 flavour of a GPU architecture: arch is ROCm's gcnArchName ("gfx942:sramecc+:xnack-"; the features after
    the colon do not matter), None for NVIDIA and the CPU. gfx942 -> e4m3fnuz (max 240); gfx950, NVIDIA -> e4m3fn (448).
    The one place the choice is made: `fp8_dtype` asks it of the device, the AMD compile checks of their target."""
    if arch is not None and arch.split(":")[0] in FP8_E4M3FNUZ_ARCHS:
        return torch.float8_e4m3fnuz
    return torch.float8_e4m3fn


@functools.cache
def _rocm_arch(index: int) -> str:
    return torch.cuda.get_device_properties(index).gcnArchName


def fp8_dtype() -> torch.dtype:
    """The e4m3 flavour of this process's GPU (`fp8_dtype_for_arch` of its architecture): e4m3fnuz on an MI300X
    (gfx942, max 240), e4m3fn on an MI350X (gfx950) and on NVIDIA (max 448); e4m3fn on the CPU. A ROCm build of
    torch with no GPU visible keeps MI300X's e4m3fnuz.

    Every process of one deployment runs on the same device (they share its memory), so they all read the same
    architecture and agree on the pool's dtype; nothing is configured per process. A pool of the other flavour (tests,
    the quality table's MI300X row on the CPU) is asked for explicitly: `KVPool.allocate(..., fp8=...)`, and every
    reader takes the flavour from the cache tensor's dtype (`quantize`'s `dtype`).
    """
    if torch.version.hip is None:
        return torch.float8_e4m3fn
    if not torch.cuda.is_available():
        return torch.float8_e4m3fnuz
    return fp8_dtype_for_arch(_rocm_arch(torch.cuda.current_device()))


def is_fp8(dtype: torch.dtype) -> bool:
    return dtype in (torch.float8_e4m3fn, torch.float8_e4m3fnuz)


class KVFormat(str, enum.Enum):
    """How one of K or V is stored. The value is the spelling used in `--kv-dtype`."""

    BF16 = "bf16"
    FP16 = "fp16"
    FP32 = "fp32"
    INT8 = "int8"
    FP8 = "fp8"

    def __str__(self) -> str:
        return self.value

    @property
    def storage_dtype(self) -> torch.dtype:
        """The element dtype of the cache tensor for this format."""
        if self is KVFormat.FP8:
            return fp8_dtype()
        return _STORAGE_DTYPES[self]

    @property
    def has_scale(self) -> bool:
        """Whether the format stores a float32 scale per token and head next to the data."""
        return self in (KVFormat.INT8, KVFormat.FP8)

    @property
    def qmax(self) -> float:
        """Largest magnitude of the quantized grid (scale = amax / qmax). Only for scaled formats."""
        if self is KVFormat.INT8:
            return INT8_MAX
        if self is KVFormat.FP8:
            return float(torch.finfo(fp8_dtype()).max)
        raise ValueError(f"KV format {self} is not quantized")

    @classmethod
    def from_torch_dtype(cls, dtype: torch.dtype) -> KVFormat:
        """The unscaled format that stores `dtype` as is (what `auto` means for a model of that dtype)."""
        for fmt, storage in _STORAGE_DTYPES.items():
            if storage == dtype and not fmt.has_scale:
                return fmt
        raise ValueError(f"no KV format stores {dtype} as is; pick one of bf16, fp16, fp32 explicitly")


_STORAGE_DTYPES: dict[KVFormat, torch.dtype] = {
    KVFormat.BF16: torch.bfloat16,
    KVFormat.FP16: torch.float16,
    KVFormat.FP32: torch.float32,
    KVFormat.INT8: torch.int8,
}

SCALE_DTYPE = torch.float32


@dataclass(frozen=True)
class KVSpec:
    """The formats of a pool: K and V separately."""

    k: KVFormat
    v: KVFormat

    def __str__(self) -> str:
        # Round-trips through parse_kv_dtype.
        if self.k is self.v:
            return str(self.k)
        return f"k={self.k},v={self.v}"


def _parse_format(word: str, model_dtype: torch.dtype, text: str) -> KVFormat:
    if word == "auto":
        return KVFormat.from_torch_dtype(model_dtype)
    try:
        return KVFormat(word)
    except ValueError:
        choices = ", ".join(["auto", *(f.value for f in KVFormat)])
        raise ValueError(f"bad kv dtype {text!r}: unknown format {word!r} (choose from {choices})") from None


def parse_kv_dtype(text: str, model_dtype: torch.dtype) -> KVSpec:
    """Parse `--kv-dtype`: one format for both ("auto", "int8", "fp8", "bf16", ...) or "k=int8,v=bf16".

    "auto" means the model's dtype, unquantized. In the k=/v= form both keys must be given, once each.
    """
    cleaned = text.strip().lower()
    if not cleaned:
        raise ValueError("bad kv dtype '': empty")
    if "=" not in cleaned:
        fmt = _parse_format(cleaned, model_dtype, text)
        return KVSpec(k=fmt, v=fmt)

    parts: dict[str, KVFormat] = {}
    for item in cleaned.split(","):
        key, sep, value = (s.strip() for s in item.partition("="))
        if not sep or key not in ("k", "v") or not value:
            raise ValueError(f"bad kv dtype {text!r}: expected 'k=FORMAT,v=FORMAT', got item {item.strip()!r}")
        if key in parts:
            raise ValueError(f"bad kv dtype {text!r}: {key!r} given twice")
        parts[key] = _parse_format(value, model_dtype, text)
    if set(parts) != {"k", "v"}:
        raise ValueError(f"bad kv dtype {text!r}: both k= and v= are needed")
    return KVSpec(k=parts["k"], v=parts["v"])


def bytes_per_token(spec: KVSpec, num_layers: int, num_kv_heads: int, head_dim: int) -> int:
    """Bytes one token occupies in the pool over all layers: K and V data plus their scales (if any)."""
    total = 0
    for fmt in (spec.k, spec.v):
        per_head = head_dim * fmt.storage_dtype.itemsize
        if fmt.has_scale:
            per_head += SCALE_DTYPE.itemsize
        total += per_head * num_kv_heads
    return total * num_layers


def quantize(
    x: torch.Tensor, fmt: KVFormat, dtype: torch.dtype | None = None
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Convert `x` [..., head_dim] to `fmt`: (data [..., head_dim] in fmt.storage_dtype, scale [...] float32 or None).
    dtype: the storage dtype to write (the cache tensor's), default fmt.storage_dtype; for fp8 it picks the flavour
    (e4m3fn or e4m3fnuz) and with it the grid's max (448 or 240).

    Scaled formats are symmetric with one scale per row (per token and head): scale = max(amax, AMAX_FLOOR) / qmax,
    data = x / scale rounded to the grid (int8: round half to even, clamp to [-127, 127]; fp8: the cast rounds to
    nearest, after clamping to the finite range). Math in float32 whatever x's dtype.
    """
    dtype = dtype or fmt.storage_dtype
    if not fmt.has_scale:
        return x.to(dtype), None
    if fmt is KVFormat.FP8 and not is_fp8(dtype):
        raise ValueError(f"fp8 KV is stored as e4m3fn or e4m3fnuz, not {dtype}")
    qmax = float(torch.finfo(dtype).max) if fmt is KVFormat.FP8 else fmt.qmax
    x32 = x.float()
    # [...]
    amax = x32.abs().amax(dim=-1).clamp_min(AMAX_FLOOR)
    scale = amax / qmax
    scaled = x32 / scale.unsqueeze(-1)
    if fmt is KVFormat.INT8:
        data = scaled.round().clamp_(-INT8_MAX, INT8_MAX).to(torch.int8)
    else:
        # |scaled| <= qmax up to rounding of the division; the clamp keeps the cast from overflowing to NaN.
        data = scaled.clamp_(-qmax, qmax).to(dtype)
    return data, scale


def dequantize(data: torch.Tensor, scale: torch.Tensor | None, fmt: KVFormat, out_dtype: torch.dtype) -> torch.Tensor:
    """Inverse of `quantize`: data [..., head_dim], scale [...] (None for unscaled formats) -> [..., head_dim]."""
    if not fmt.has_scale:
        return data.to(out_dtype)
    if scale is None:
        raise ValueError(f"KV format {fmt} needs a scale to dequantize")
    return (data.float() * scale.unsqueeze(-1)).to(out_dtype)


@dataclass(frozen=True)
class LayerKV:
    """One layer's views into the pool, plus the formats needed to read them: what kernels take (kvstore/pool.py makes
    them; kernels import only this module of kvstore)."""

    k_cache: torch.Tensor  # [num_blocks, block_size, num_kv_heads, head_dim] in k_format.storage_dtype
    v_cache: torch.Tensor  # [num_blocks, block_size, num_kv_heads, head_dim] in v_format.storage_dtype
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

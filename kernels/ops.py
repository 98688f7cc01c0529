"""The one place the model calls kernels through.

Today every op is its torch reference; the Triton kernels (GPU issue) replace entries here when the tensors live on a
GPU, so the model code never changes and every kernel keeps its reference beside it for tests.
"""

from __future__ import annotations

from kernels.activation import silu_and_mul_ref as silu_and_mul
from kernels.decode_attention import paged_decode_attention_ref as paged_decode_attention
from kernels.norm import fused_add_rms_norm_ref as fused_add_rms_norm
from kernels.norm import rms_norm_ref as rms_norm
from kernels.prefill_attention import paged_prefill_attention_ref as paged_prefill_attention
from kernels.rotary import rotary_ref as rotary
from kernels.store_kv import store_kv_ref as store_kv

__all__ = [
    "fused_add_rms_norm",
    "paged_decode_attention",
    "paged_prefill_attention",
    "rms_norm",
    "rotary",
    "silu_and_mul",
    "store_kv",
]

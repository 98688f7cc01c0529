"""SiLU-and-mul (the gated MLP activation), torch reference."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def silu_and_mul_ref(x: torch.Tensor) -> torch.Tensor:
    """x [..., 2 * d] = cat(gate, up) -> silu(gate) * up [..., d], in x's dtype (math in float32)."""
    d = x.shape[-1] // 2
    if x.shape[-1] != 2 * d:
        raise ValueError(f"last dim must be even (gate and up halves), got {x.shape[-1]}")
    x32 = x.float()
    return (F.silu(x32[..., :d]) * x32[..., d:]).to(x.dtype)

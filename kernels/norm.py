"""RMSNorm and fused residual-add + RMSNorm, torch references.

Both match HF's LlamaRMSNorm bit for bit: normalize in float32, round to the input dtype, then multiply by the
weight. The fused form is what a decoder layer runs between blocks (residual += x; x = norm(residual)).
"""

from __future__ import annotations

import torch


def rms_norm_ref(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """x [..., hidden], weight [hidden] -> [..., hidden] in x's dtype."""
    x32 = x.float()
    # [..., 1]
    inv_rms = torch.rsqrt(x32.pow(2).mean(dim=-1, keepdim=True) + eps)
    return (weight * (x32 * inv_rms).to(x.dtype)).to(x.dtype)


def fused_add_rms_norm_ref(
    x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """new_residual = x + residual (added in float32, rounded to x's dtype); normed = rms_norm(new_residual).

    x, residual: [..., hidden]; returns (normed, new_residual), both [..., hidden] in x's dtype. The norm reads the
    rounded new_residual, the value the next layer adds to, as the unfused HF model does.
    """
    new_residual = (x.float() + residual.float()).to(x.dtype)
    return rms_norm_ref(new_residual, weight, eps), new_residual

"""Batch-1 linear layer (GEMV), torch reference: y = x W^T (+ b), the exact float32 product.

The Triton GEMV (kernels/triton_gemv.py) accumulates in float32 as well and rounds y once to x's dtype, so the two
differ by that rounding (and the order of the sums). Its prologues and epilogues are this product composed with the
references of what they fuse: kernels/norm.py before it, kernels/activation.py before or after it, and the residual
add of kernels/norm.py's fused_add_rms_norm_ref after it.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def gemv_ref(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """x [tokens, K] (one row for the GEMV), weight [N, K], bias [N] or None -> x weight^T (+ bias) [tokens, N],
    float32, computed in float32 (not rounded to x's dtype)."""
    return F.linear(x.float(), weight.float(), None if bias is None else bias.float())

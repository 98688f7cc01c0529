"""Skinny GEMM (the few rows of a decode batch), torch reference: y = x W^T rounded once to x's dtype, and with the
SILU_MUL_OUT epilogue the MLP's activation of that y (kernels/activation.py's silu_and_mul_ref).

The Triton skinny GEMM (kernels/triton_skinny_gemm.py) accumulates in float32 too and rounds at the same points; the
sums go in another order.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from kernels.activation import silu_and_mul_ref


def skinny_gemm_ref(x: torch.Tensor, weight: torch.Tensor, silu_mul_out: bool = False) -> torch.Tensor:
    """x [M, K], weight [N, K] -> y = x weight^T [M, N] in x's dtype (float32 products rounded once); silu_mul_out:
    weight [2N, K] = cat(gate, up) and the result silu(gate) * up [M, N] of that rounded y."""
    y = F.linear(x.float(), weight.float()).to(x.dtype)
    return silu_and_mul_ref(y) if silu_mul_out else y

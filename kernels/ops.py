"""The one place the model calls kernels through, and the one table of which kernel runs when.

A tensor on a GPU (`tensor.is_cuda`: CUDA or ROCm, with triton importable) takes a Triton kernel; a tensor on the CPU
takes the torch reference (Triton's CPU path is the interpreter, which the tests use, far too slow to serve). The model
code never changes, and every kernel keeps its reference beside it: kernels/<op>.py beside kernels/triton_<op>.py.

op                             CPU                                  GPU
store_kv                       store_kv.store_kv_ref                triton_store_kv.store_kv
paged_decode_attention         decode_attention.                    triton_decode_attention.paged_decode_attention: the
                                 paged_decode_attention_ref           split kernel, + the reduce kernel with > 1 split
paged_prefill_attention        prefill_attention.                   triton_prefill_attention.paged_prefill_attention
                                 paged_prefill_attention_ref
rms_norm                       norm.rms_norm_ref                    triton_norm.rms_norm
fused_add_rms_norm             norm.fused_add_rms_norm_ref          triton_norm.fused_add_rms_norm; x a `Partials`:
                                 (a `Partials` x summed first)        triton_norm.fused_add_rms_norm_parts (sums them)
rotary                         rotary.rotary_ref                    triton_rotary.rotary
rotary_store_kv                rotary_ref, then store_kv_ref        triton_rotary_store_kv.rotary_store_kv (one kernel);
                                                                      its FUSED off: the rotary, then store_kv kernel
rotary_store_decode_attention  decode_attention.                    triton_decode_attention.FUSED_ROTARY on: the
                                 rotary_store_decode_attention_ref    attention kernel given the new token (rotary and
                                                                      K/V store inside; + reduce); off: rotary_store_kv
                                                                      as above, then paged_decode_attention's kernels
silu_and_mul                   activation.silu_and_mul_ref          triton_activation.silu_and_mul
linear                         torch's F.linear                     1 row: triton_gemv.gemv (TRITON_GEMV); 2..64 rows
                                                                      (SKINNY_ROWS), no bias, <= 32768 outputs
                                                                      (SKINNY_MAX_COLUMNS): triton_skinny_gemm
                                                                      (SKINNY_GEMM); otherwise, or where the kernel
                                                                      declines the shape (returns None): F.linear
                                                                      (cuBLAS, hipBLAS)

Both take only a 2-D x of bf16 or fp16 with a weight of its dtype; gemv() declines a K that is not a multiple of 64,
a weight not unit-stride along K or a non-contiguous x, skinny_gemm() a K not a multiple of 64 or operands not
unit-stride along K. The fused forms below run on the GPU only; on the CPU each is the ops above in sequence (torch
references and F.linear):

linear_add      1 row, SUMSQ_NORM: triton_gemv ADD_RES_SUMSQ (y + residual and the partial sums of its squares, a
                `Summed`); otherwise None: the caller projects, the next norm adds the residual
norm_linear     x a `Summed`: triton_gemv NORM_SUMSQ (the norm from the partial sums; no norm kernel); x `Partials`:
                fused_add_rms_norm_parts, then linear; 1 row with "norm" in FUSE: triton_gemv NORM / ADD_NORM;
                otherwise rms_norm or fused_add_rms_norm, then linear
norm_mlp        x a `Summed`: gate_up triton_gemv NORM_SUMSQ with the SILU_MUL_OUT epilogue (no gate_up bias), down
                through linear_add; 1 row with GATE_UP_SILU (no bias, "norm" not in FUSE): the norm, then gate_up
                triton_gemv SILU_MUL_OUT, then linear; 2..64 rows (linear's skinny case, SKINNY_GEMM): the norm, then
                gate_up triton_skinny_gemm SILU_MUL_OUT, then down_proj triton_skinny_gemm in SPLIT_DOWN parts of K
                left as `Partials` (SPLIT_DOWN 1, or the kernel declining: linear); otherwise norm_linear, then
                silu_mul_linear. A GEMV/GEMM declining the shape falls back to the unfused ops
silu_mul_linear 1 row with "silu" in FUSE: triton_gemv SILU_MUL; otherwise silu_and_mul, then linear

`Summed` exists only after linear_add and `Partials` only after norm_mlp's split down_proj, both on a GPU. The model
(services/model/llama.py) calls rotary_store_kv and paged_prefill_attention for a prefill, rotary_store_decode_attention
for a decode step; with the defaults a batch-1 decode step on a GPU runs no norm kernel inside a layer once the first
layer's o_proj has added the residual (linear_add).

The switches are module attributes read at each call (A/B in one process: bench/model_bench.py --sweep
kernels.ops.NAME=1,0): here TRITON_GEMV, FUSE, GATE_UP_SILU, SKINNY_GEMM, SUMSQ_NORM (from KVRELAY_TRITON_GEMV,
KVRELAY_FUSE, ... at import; FUSE empty, the others on by default), SKINNY_ROWS, SKINNY_MAX_COLUMNS and SPLIT_DOWN;
FUSED_ROTARY in kernels/triton_decode_attention.py and FUSED in kernels/triton_rotary_store_kv.py (both on). PDL is
not chosen here: every Triton kernel launches with it on NVIDIA sm_90 and newer, off on ROCm, before sm_90 and with
KVRELAY_PDL=0 (kernels/pdl.py).
"""

from __future__ import annotations

import os
from typing import NamedTuple

import torch

from kernels import activation, decode_attention, norm, prefill_attention
from kernels import rotary as rotary_ref_mod
from kernels import store_kv as sk

try:  # triton is a GPU dependency; a CPU install may not have it
    import triton  # noqa: F401

    HAVE_TRITON = True
except ImportError:
    HAVE_TRITON = False


# KVRELAY_TRITON_GEMV=0 sends batch-1 linear layers to cuBLAS; KVRELAY_FUSE lists the GEMV prologues in use
# ("norm,silu": the layer norms and the MLP activation fused into the projections). Off by default: measured on an
# H200 (batch-1 decode, 8B shape, fraction of floor, two runs each): none 0.810 / 0.818, silu 0.772 / 0.792,
# norm+silu 0.787. Every GEMV program needs the whole input row, so a prologue is recomputed by each of hundreds of
# programs at the head of its critical path (14336 exps each for silu), which costs more than the kernel it saves
# once launches are overlapped (kernels/pdl.py).
TRITON_GEMV = os.environ.get("KVRELAY_TRITON_GEMV", "1") != "0"
FUSE = set(os.environ.get("KVRELAY_FUSE", "").split(","))
# The MLP's activation as the epilogue of the batch-1 gate_up GEMV (kernels/triton_gemv.py SILU_MUL_OUT), read per
# call: A/B with bench/model_bench.py --sweep kernels.ops.GATE_UP_SILU=1,0
GATE_UP_SILU = os.environ.get("KVRELAY_GATE_UP_SILU", "1") != "0"
# Linear layers of 2..64 rows (decode batches) through the Triton skinny GEMM (kernels/triton_skinny_gemm.py), the
# MLP's activation as gate_up's epilogue; read per call: A/B with model_bench --sweep kernels.ops.SKINNY_GEMM=1,0.
# H200, 8B shape, int8 KV, 1k context, fraction of the decode floor, on / off alternating in one process: batch 16
# 0.738 / 0.701, 64 0.766 / 0.734, 128 0.630 / 0.696 (so 128 rows stay with cuBLAS).
SKINNY_GEMM = os.environ.get("KVRELAY_SKINNY_GEMM", "1") != "0"
# Wider outputs (the lm_head) stay with cuBLAS, which reads them near the floor already.
SKINNY_MAX_COLUMNS = 32768
# The row counts (decode batch buckets) routed to it
SKINNY_ROWS = (2, 64)
# Batch-1 layers without norm kernels (kernels/triton_gemv.py ADD_RES_SUMSQ / NORM_SUMSQ): o_proj and down_proj add
# the residual themselves and leave partial sums of squares, with which the next projection normalizes its input.
# Read per call: A/B with model_bench --sweep kernels.ops.SUMSQ_NORM=1,0
SUMSQ_NORM = os.environ.get("KVRELAY_SUMSQ_NORM", "1") != "0"


# Decode batches on the skinny GEMM: down_proj cut in SPLIT_DOWN parts along K (1: not cut), its float32 partial sums
# handed to the next layer's fused add + norm, which adds them (`Partials`): half the reads of the activations from L2
# per program (bench/tune_skinny_gemm.py --no-sum, H200, 64 rows: 31.4 us in 2 splits of 64-column tiles against ~33
# unsplit, without the sum). Decode steps, H200, 8B shape, int8 KV, 1k context, one process, 2 / 1 alternating
# (bench/results/tune_settings_2026-12-04h.json, i.json): batch 8 4.752 / 4.785 ms, batch 32 5.545 / 5.658, batch 64
# 5.996-6.003 / 6.025-6.103 (the skinny GEMM's PRELOAD on or off: no difference); again with the skinny GEMM's early
# trigger (tune_settings_2026-12-04t.json): batch 8 4.754 and 4.761 / 4.746 and 4.767, batch 64 6.019 and 6.035 /
# 6.072 and 6.102. Read at each call
# (`model_bench --sweep kernels.ops.SPLIT_DOWN=2,1 --batches 64`).
SPLIT_DOWN = 2


class Partials(NamedTuple):
    """A projection's output left as float32 partial sums [S, tokens, out] (a split-K skinny GEMM's), for the fused
    add + norm after it to add; `dtype` is the output's dtype (what the sum is rounded to)."""

    parts: torch.Tensor
    dtype: torch.dtype

    def dense(self) -> torch.Tensor:
        return self.parts.sum(0).to(self.dtype)


class Summed(NamedTuple):
    """The residual stream as a projection that added the residual itself leaves it: `hidden` = its output + the old
    residual (the new residual), `sumsq` the partial sums of hidden's squares (float32), for the next norm."""

    hidden: torch.Tensor
    sumsq: torch.Tensor


def _gpu(t: torch.Tensor) -> bool:
    return HAVE_TRITON and t.is_cuda


def store_kv(key, value, layer, slot_mapping) -> None:
    if _gpu(key):
        from kernels.triton_store_kv import store_kv as kernel

        return kernel(key, value, layer, slot_mapping)
    return sk.store_kv_ref(key, value, layer, slot_mapping)


def paged_decode_attention(query, layer, block_tables, context_lens, scale, max_context_len=None):
    if _gpu(query):
        from kernels.triton_decode_attention import paged_decode_attention as kernel

        return kernel(query, layer, block_tables, context_lens, scale, max_context_len=max_context_len)
    return decode_attention.paged_decode_attention_ref(query, layer, block_tables, context_lens, scale)


def paged_prefill_attention(query, layer, block_tables, cu_seqlens_q, context_lens, scale, max_query_len=None):
    if _gpu(query):
        from kernels.triton_prefill_attention import paged_prefill_attention as kernel

        return kernel(query, layer, block_tables, cu_seqlens_q, context_lens, scale, max_query_len=max_query_len)
    return prefill_attention.paged_prefill_attention_ref(query, layer, block_tables, cu_seqlens_q, context_lens, scale)


def rms_norm(x, weight, eps):
    if _gpu(x):
        from kernels.triton_norm import rms_norm as kernel

        return kernel(x, weight, eps)
    return norm.rms_norm_ref(x, weight, eps)


def fused_add_rms_norm(x, residual, weight, eps):
    """x may be `Partials` (summed and rounded first: in the kernel on a GPU)."""
    if isinstance(x, Partials):
        if _gpu(residual):
            from kernels.triton_norm import fused_add_rms_norm_parts

            return fused_add_rms_norm_parts(x.parts, residual, weight, eps)
        x = x.dense()
    if _gpu(x):
        from kernels.triton_norm import fused_add_rms_norm as kernel

        return kernel(x, residual, weight, eps)
    return norm.fused_add_rms_norm_ref(x, residual, weight, eps)


def rotary(positions, query, key, cos_sin_cache):
    if _gpu(query):
        from kernels.triton_rotary import rotary as kernel

        return kernel(positions, query, key, cos_sin_cache)
    return rotary_ref_mod.rotary_ref(positions, query, key, cos_sin_cache)


def rotary_store_decode_attention(positions, query, key, value, cos_sin_cache, layer, slot_mapping, block_tables,
                                  context_lens, scale, max_context_len=None):  # fmt: skip
    """A decode step's attention from the qkv projection's output: rotary, the new K/V into the pool, attention over
    the pool. One kernel on a GPU (kernels.triton_decode_attention.FUSED_ROTARY; off: rotary_store_kv's kernel, then
    the attention kernel); the references in sequence on the CPU."""
    new = decode_attention.NewToken(positions, key, value, cos_sin_cache, slot_mapping)
    if _gpu(query):
        from kernels import triton_decode_attention as kernel

        if kernel.FUSED_ROTARY:
            return kernel.paged_decode_attention(
                query, layer, block_tables, context_lens, scale, max_context_len=max_context_len, new=new
            )
        query = rotary_store_kv(positions, query, key, value, cos_sin_cache, layer, slot_mapping)
        return kernel.paged_decode_attention(
            query, layer, block_tables, context_lens, scale, max_context_len=max_context_len
        )
    return decode_attention.rotary_store_decode_attention_ref(query, layer, block_tables, context_lens, scale, new)


def rotary_store_kv(positions, query, key, value, cos_sin_cache, layer, slot_mapping):
    """rotary, then store_kv of the rotated key and the value; returns the rotated query. One kernel on a GPU (two
    with kernels.triton_rotary_store_kv.FUSED off, for an A/B); the references in sequence on the CPU."""
    if _gpu(query):
        from kernels import triton_rotary_store_kv as fused

        if fused.FUSED:
            return fused.rotary_store_kv(positions, query, key, value, cos_sin_cache, layer, slot_mapping)
    query, key = rotary(positions, query, key, cos_sin_cache)
    store_kv(key, value, layer, slot_mapping)
    return query


def silu_and_mul(x):
    if _gpu(x):
        from kernels.triton_activation import silu_and_mul as kernel

        return kernel(x)
    return activation.silu_and_mul_ref(x)


def _gemv_ok(x, weight) -> bool:
    """One 16-bit row on a GPU, weight of its dtype: the Triton GEMV's case (kernels/triton_gemv.py)."""
    return (
        TRITON_GEMV
        and _gpu(x)
        and x.dim() == 2
        and x.shape[0] == 1
        and x.dtype in (torch.bfloat16, torch.float16)
        and weight.dtype == x.dtype
    )


def _skinny_ok(x, weight, bias=None) -> bool:
    """SKINNY_ROWS 16-bit rows on a GPU, weight of their dtype, no bias: the Triton skinny GEMM's case (it declines
    more rows than it handles itself)."""
    return (
        SKINNY_GEMM
        and bias is None
        and _gpu(x)
        and x.dim() == 2
        and max(2, SKINNY_ROWS[0]) <= x.shape[0] <= SKINNY_ROWS[1]
        and x.dtype in (torch.bfloat16, torch.float16)
        and weight.dtype == x.dtype
        and weight.shape[0] <= SKINNY_MAX_COLUMNS
    )


def linear(x, weight, bias=None):
    """x [tokens, in] -> [tokens, out]. One 16-bit row on a GPU takes the Triton GEMV (faster weight streaming than
    cuBLAS at batch 1), SKINNY_ROWS rows the Triton skinny GEMM (SKINNY_GEMM); everything else is torch's (cuBLAS,
    or the CPU)."""
    if _gemv_ok(x, weight):
        from kernels.triton_gemv import gemv

        out = gemv(x, weight, bias)
        if out is not None:
            return out[0]
    elif _skinny_ok(x, weight, bias):
        from kernels.triton_skinny_gemm import skinny_gemm

        out = skinny_gemm(x, weight)
        if out is not None:
            return out
    return torch.nn.functional.linear(x, weight, bias)


def linear_add(x, weight, bias, residual) -> Summed | None:
    """Summed(linear(x) + residual, its partial sums of squares) in one kernel, on the batch-1 GEMV path with
    SUMSQ_NORM; None otherwise (the caller projects and lets the next norm add the residual)."""
    if not (SUMSQ_NORM and residual is not None and _gemv_ok(x, weight)):
        return None
    from kernels import triton_gemv as g

    out = g.gemv(x, weight, bias, residual=residual, epilogue=g.ADD_RES_SUMSQ)
    return None if out is None else Summed(*out)


def _summed_norm_gemv(x: Summed, norm_weight, eps, weight, bias=None, epilogue=0):
    """y = rms_norm(x.hidden) * norm_weight projected (NORM_SUMSQ), or None if the GEMV declines the shape."""
    from kernels import triton_gemv as g

    out = g.gemv(x.hidden, weight, bias, g.NORM_SUMSQ, None, norm_weight, eps, epilogue=epilogue, sumsq=x.sumsq)
    return None if out is None else out[0]


def norm_linear(x, residual, norm_weight, eps, weight, bias=None):
    """linear(rms_norm(x)) with residual None (new residual: x itself), else linear(rms_norm(x + residual)) and the
    new residual x + residual. One kernel on the GEMV path, the unfused kernels otherwise. Returns (y, new_residual).
    x may be a `Summed` (residual None): the residual is already added and the sums of squares known; or `Partials`
    (residual given): the fused add + norm sums them.
    """
    if isinstance(x, Partials):
        normed, new_residual = fused_add_rms_norm(x, residual, norm_weight, eps)
        return linear(normed, weight, bias), new_residual
    if isinstance(x, Summed):
        y = _summed_norm_gemv(x, norm_weight, eps, weight, bias)
        if y is None:
            y = linear(rms_norm(x.hidden, norm_weight, eps), weight, bias)
        return y, x.hidden
    if "norm" in FUSE and _gemv_ok(x, weight):
        from kernels import triton_gemv as g

        out = g.gemv(x, weight, bias, g.NORM if residual is None else g.ADD_NORM, residual, norm_weight, eps)
        if out is not None:
            return out[0], x if residual is None else out[1]
    normed, new_residual = _norm(x, residual, norm_weight, eps)
    return linear(normed, weight, bias), new_residual


def _norm(x, residual, norm_weight, eps):
    """(rms_norm(x), x) with residual None, else (rms_norm(x + residual), x + residual)."""
    if residual is None:
        return rms_norm(x, norm_weight, eps), x
    return fused_add_rms_norm(x, residual, norm_weight, eps)


def norm_mlp(x, residual, norm_weight, eps, gate_up_weight, gate_up_bias, down_weight, down_bias):
    """The MLP after its norm: down(silu_and_mul(gate_up(rms_norm(x [+ residual])))), and the new residual (as
    norm_linear). At batch 1 on a GPU with GATE_UP_SILU, the activation is the gate_up GEMV's epilogue; at
    SKINNY_ROWS rows with SKINNY_GEMM, the skinny GEMM's. x may be a `Summed` (residual None; see linear_add): then
    down_proj adds the residual too where it can, and the result is (Summed, None)."""
    if isinstance(x, Summed):
        from kernels import triton_gemv as g

        act = None if gate_up_bias is not None else _summed_norm_gemv(x, norm_weight, eps, gate_up_weight,
                                                                      epilogue=g.SILU_MUL_OUT)  # fmt: skip
        if act is None:
            normed = rms_norm(x.hidden, norm_weight, eps)
            act = silu_and_mul(linear(normed, gate_up_weight, gate_up_bias))
        summed = linear_add(act, down_weight, down_bias, x.hidden)
        if summed is not None:
            return summed, None
        return linear(act, down_weight, down_bias), x.hidden
    gemv_epilogue = GATE_UP_SILU and gate_up_bias is None and "norm" not in FUSE and _gemv_ok(x, gate_up_weight)
    if gemv_epilogue or _skinny_ok(x, gate_up_weight, gate_up_bias):
        normed, new_residual = _norm(x, residual, norm_weight, eps)
        act = _gate_up_silu(normed, gate_up_weight, gemv_epilogue)
        if act is not None:
            return _down_projection(act, down_weight, down_bias), new_residual
        # no kernel config for this shape: the norm is done, the rest as below
        return silu_mul_linear(linear(normed, gate_up_weight), down_weight, down_bias), new_residual
    gate_up, new_residual = norm_linear(x, residual, norm_weight, eps, gate_up_weight, gate_up_bias)
    return silu_mul_linear(gate_up, down_weight, down_bias), new_residual


def _down_projection(act, down_weight, down_bias):
    """linear(act, down_weight, down_bias), or its `Partials` with SPLIT_DOWN on the skinny GEMM's rows."""
    if SPLIT_DOWN > 1 and _skinny_ok(act, down_weight, down_bias):
        from kernels.triton_skinny_gemm import skinny_gemm

        parts = skinny_gemm(act, down_weight, splits=SPLIT_DOWN)
        if parts is not None:
            return Partials(parts, act.dtype)
    return linear(act, down_weight, down_bias)


def _gate_up_silu(x, gate_up_weight, gemv: bool):
    """silu(gate) * up of x's gate_up projection in one kernel: the batch-1 GEMV's epilogue (gemv) or the skinny
    GEMM's; None if the kernel has no config for the shape."""
    if gemv:
        from kernels import triton_gemv as g

        out = g.gemv(x, gate_up_weight, epilogue=g.SILU_MUL_OUT)
        return None if out is None else out[0]
    from kernels import triton_skinny_gemm as sg

    return sg.skinny_gemm(x, gate_up_weight, sg.SILU_MUL_OUT)


def silu_mul_linear(gate_up, weight, bias=None):
    """linear(silu_and_mul(gate_up)): one kernel on the GEMV path."""
    if "silu" in FUSE and _gemv_ok(gate_up, weight) and gate_up.shape[1] == 2 * weight.shape[1]:
        from kernels import triton_gemv as g

        out = g.gemv(gate_up, weight, bias, g.SILU_MUL)
        if out is not None:
            return out[0]
    return linear(silu_and_mul(gate_up), weight, bias)

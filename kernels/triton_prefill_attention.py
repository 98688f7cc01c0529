"""paged_prefill_attention, Triton: flash attention of a varlen batch of new tokens over their paged, quantized KV.

Same contract as kernels/prefill_attention.paged_prefill_attention_ref: every key (cached prefix and new tokens alike)
is read from the pool through the block table, and dequantized on load with its per token-head scale.

One program per (tile of BLOCK_M new tokens, sequence, query head). It walks key tiles of BLOCK_N tokens in two
phases: tiles wholly below the causal diagonal of the tile's first query (no mask at all), then the few tiles that
cross the diagonal (masked). Key tiles past the tile's last query are never touched. Softmax is online, in float32,
in base 2 (scale * log2(e) folded into one multiplier).

Quantized K/V stay in their storage dtype until the tile is in registers, and the scales are applied where they cost
least: a key's scale multiplies its column of scores (BLOCK_N multiplies instead of BLOCK_N * head_dim), a value's
scale multiplies its column of probabilities before P @ V. int8 and e4m3 values convert to bf16/fp16 exactly, so the
tensor-core dots see the stored grid values and only the float32 scale products differ from the reference's order.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from triton.backends.compiler import GPUTarget

from kernels import targets
from kvstore.formats import LayerKV

LOG2E = 1.4426950408889634
# Caches of at least this many elements index with int64 (int32 offset arithmetic is ~10% faster on H200).
OFFSETS_64_FROM = 2**31

# AMD's (BLOCK_M, BLOCK_N, num_warps, num_stages) for head_dim <= 128 by V's format, compiled, not measured: what
# tests/kernels/compile_gfx942.py finds without spills and at 2 waves/SIMD on gfx942 and gfx950 (Triton 3.6, 8B shape,
# every KV format). The usual Triton flash-attention shape there, 128 x 64 with 4 warps, keeps 1 wave/SIMD (256 VGPRs
# and AGPRs beyond) and spills with int8/fp8 K/V: the [BLOCK_N, head_dim] tiles of 64-bit K and V pointers (paged:
# one address per element) take most of the registers. 8 warps halve each wave's share, and Triton then holds the
# kernel to 256 registers (2 waves/SIMD); a dequantized V needs the key tile down to 16 tokens to stay in them.
AMD_PREFILL_TILES = {"bf16_v": (128, 32, 8, 1), "quantized_v": (128, 16, 8, 1)}


@triton.jit
def _masked_load(ptrs, mask):
    """Masked load whose masked-off lanes read 0. fp8 goes through its bytes: `other` cannot be cast to fp8
    everywhere (the interpreter refuses), and the all-zero byte is +0.0 in both e4m3fn and e4m3fnuz."""
    if ptrs.dtype.element_ty.is_fp8():
        raw = tl.load(ptrs.to(tl.pointer_type(tl.uint8)), mask=mask, other=0)
        return raw.to(ptrs.dtype.element_ty, bitcast=True)
    else:
        return tl.load(ptrs, mask=mask, other=0)


@triton.jit
def _attend_tile(
    acc,
    l_i,
    m_i,
    q,
    start_n,
    q_pos,
    context_len,
    table_row_ptr,
    k_head_ptr,
    v_head_ptr,
    k_scale_head_ptr,
    v_scale_head_ptr,
    stride_kb,
    stride_kt,
    stride_vb,
    stride_vt,
    stride_ksb,
    stride_kst,
    stride_vsb,
    stride_vst,
    qk_scale,
    BLOCK_SIZE: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_N: tl.constexpr,
    K_SCALED: tl.constexpr,
    V_SCALED: tl.constexpr,
    MASKED: tl.constexpr,
    IEEE_DOT: tl.constexpr,
    OFFSETS_64: tl.constexpr,
):
    """One key tile [start_n, start_n + BLOCK_N) into the running (acc, l_i, m_i) of a query tile.

    MASKED=False: every key of the tile is visible to every query of the tile (so also < context_len): no masks.
    """
    offs_n = start_n + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    n_valid = offs_n < context_len
    # Physical block of each key position.
    if MASKED:
        block_ids = tl.load(table_row_ptr + offs_n // BLOCK_SIZE, mask=n_valid, other=0)
    else:
        block_ids = tl.load(table_row_ptr + offs_n // BLOCK_SIZE)
    if OFFSETS_64:
        # Before the multiply: this layer's cache has 2**31 elements or more.
        block_ids = block_ids.to(tl.int64)
    within = offs_n % BLOCK_SIZE
    # [BLOCK_N] element offsets of each key's row (head_dim contiguous elements) in K and V.
    k_rows = block_ids * stride_kb + within * stride_kt
    v_rows = block_ids * stride_vb + within * stride_vt
    k_ptrs = k_head_ptr + k_rows[:, None] + offs_d[None, :]
    v_ptrs = v_head_ptr + v_rows[:, None] + offs_d[None, :]
    if MASKED:
        if HEAD_DIM == BLOCK_D:
            kv_mask = n_valid[:, None]
        else:
            kv_mask = n_valid[:, None] & (offs_d < HEAD_DIM)[None, :]
        k = _masked_load(k_ptrs, kv_mask)
        v = _masked_load(v_ptrs, kv_mask)
    else:
        if HEAD_DIM == BLOCK_D:
            k = tl.load(k_ptrs)
            v = tl.load(v_ptrs)
        else:
            d_mask = (offs_d < HEAD_DIM)[None, :]
            k = _masked_load(k_ptrs, d_mask)
            v = _masked_load(v_ptrs, d_mask)
    # [BLOCK_D, BLOCK_N]; int8 and e4m3 convert exactly. (Loading K^T straight from memory was no faster on H200.)
    k_t = tl.trans(k.to(q.dtype))

    # [BLOCK_M, BLOCK_N] float32 scores, in log2 units.
    if IEEE_DOT:
        qk = tl.dot(q, k_t, input_precision="ieee")
    else:
        qk = tl.dot(q, k_t)
    if K_SCALED:
        k_scale_ptrs = k_scale_head_ptr + block_ids * stride_ksb + within * stride_kst
        if MASKED:
            k_scale = tl.load(k_scale_ptrs, mask=n_valid, other=0.0)
        else:
            k_scale = tl.load(k_scale_ptrs)
        qk = qk * (k_scale * qk_scale)[None, :]
    else:
        qk = qk * qk_scale
    if MASKED:
        visible = (offs_n[None, :] <= q_pos[:, None]) & n_valid[None, :]
        qk = tl.where(visible, qk, float("-inf"))

    # Online softmax. Every row has seen a visible key by its first masked tile (key 0, or the diagonal tile's first
    # key), so m_new is finite and no row computes exp2(-inf - -inf).
    m_new = tl.maximum(m_i, tl.max(qk, 1))
    alpha = tl.math.exp2(m_i - m_new)
    p = tl.math.exp2(qk - m_new[:, None])
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = acc * alpha[:, None]
    if V_SCALED:
        v_scale_ptrs = v_scale_head_ptr + block_ids * stride_vsb + within * stride_vst
        if MASKED:
            v_scale = tl.load(v_scale_ptrs, mask=n_valid, other=0.0)
        else:
            v_scale = tl.load(v_scale_ptrs)
        p = p * v_scale[None, :]
    if IEEE_DOT:
        acc = tl.dot(p.to(q.dtype), v.to(q.dtype), acc, input_precision="ieee")
    else:
        acc = tl.dot(p.to(q.dtype), v.to(q.dtype), acc)
    return acc, l_i, m_new


@triton.jit
def _paged_prefill_kernel(
    q_ptr,  # [num_tokens, num_heads, head_dim]
    out_ptr,  # [num_tokens, num_heads, head_dim]
    k_cache_ptr,  # [num_blocks, block_size, num_kv_heads, head_dim]
    v_cache_ptr,
    k_scale_ptr,  # [num_blocks, block_size, num_kv_heads] float32 (unused unless K_SCALED)
    v_scale_ptr,
    block_tables_ptr,  # [num_seqs, max_blocks] int32
    cu_seqlens_ptr,  # [num_seqs + 1] int32
    context_lens_ptr,  # [num_seqs] int32
    qk_scale,  # scale * log2(e)
    stride_qt,
    stride_qh,
    stride_ot,
    stride_oh,
    stride_table,
    stride_kb,
    stride_kt,
    stride_kh,
    stride_vb,
    stride_vt,
    stride_vh,
    stride_ksb,
    stride_kst,
    stride_ksh,
    stride_vsb,
    stride_vst,
    stride_vsh,
    GROUP: tl.constexpr,
    BLOCK_SIZE: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    K_SCALED: tl.constexpr,
    V_SCALED: tl.constexpr,
    IEEE_DOT: tl.constexpr,
    OFFSETS_64: tl.constexpr,
):
    # Highest query tiles first: they have the most keys, so the long programs start early and the tail is short.
    m_tile = tl.num_programs(0) - 1 - tl.program_id(0)
    seq = tl.program_id(1)
    head = tl.program_id(2)
    q_start = tl.load(cu_seqlens_ptr + seq)
    q_len = tl.load(cu_seqlens_ptr + seq + 1) - q_start
    start_m = m_tile * BLOCK_M
    if start_m < q_len:
        context_len = tl.load(context_lens_ptr + seq)
        kv_head = head // GROUP
        offs_m = start_m + tl.arange(0, BLOCK_M)
        offs_d = tl.arange(0, BLOCK_D)
        m_valid = offs_m < q_len
        if HEAD_DIM == BLOCK_D:
            q_mask = m_valid[:, None]
        else:
            q_mask = m_valid[:, None] & (offs_d < HEAD_DIM)[None, :]
        token = (q_start + offs_m).to(tl.int64)
        q = tl.load(q_ptr + token[:, None] * stride_qt + head * stride_qh + offs_d[None, :], mask=q_mask, other=0.0)

        # New token i sits at absolute position prefix + i.
        prefix = context_len - q_len
        q_pos = prefix + offs_m
        # Tiles ending at or before the first query's position are fully visible to the whole query tile.
        full_end = (prefix + start_m + 1) // BLOCK_N * BLOCK_N
        # One past the last query's position: no key at or beyond it is visible to this tile.
        causal_end = prefix + tl.minimum(start_m + BLOCK_M, q_len)

        table_row_ptr = block_tables_ptr + seq.to(tl.int64) * stride_table
        k_head_ptr = k_cache_ptr + kv_head * stride_kh
        v_head_ptr = v_cache_ptr + kv_head * stride_vh
        k_scale_head_ptr = k_scale_ptr + kv_head * stride_ksh
        v_scale_head_ptr = v_scale_ptr + kv_head * stride_vsh

        m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
        l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
        acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
        for start_n in range(0, full_end, BLOCK_N):
            acc, l_i, m_i = _attend_tile(
                acc, l_i, m_i, q, start_n, q_pos, context_len,
                table_row_ptr, k_head_ptr, v_head_ptr, k_scale_head_ptr, v_scale_head_ptr,
                stride_kb, stride_kt, stride_vb, stride_vt, stride_ksb, stride_kst, stride_vsb, stride_vst,
                qk_scale, BLOCK_SIZE, HEAD_DIM, BLOCK_D, BLOCK_N, K_SCALED, V_SCALED, False, IEEE_DOT, OFFSETS_64,
            )  # fmt: skip
        for start_n in range(full_end, causal_end, BLOCK_N):
            acc, l_i, m_i = _attend_tile(
                acc, l_i, m_i, q, start_n, q_pos, context_len,
                table_row_ptr, k_head_ptr, v_head_ptr, k_scale_head_ptr, v_scale_head_ptr,
                stride_kb, stride_kt, stride_vb, stride_vt, stride_ksb, stride_kst, stride_vsb, stride_vst,
                qk_scale, BLOCK_SIZE, HEAD_DIM, BLOCK_D, BLOCK_N, K_SCALED, V_SCALED, True, IEEE_DOT, OFFSETS_64,
            )  # fmt: skip

        # Rows past q_len are never stored; for them l_i may be anything but 0 (they see key 0 too).
        out = acc / l_i[:, None]
        o_ptrs = out_ptr + token[:, None] * stride_ot + head * stride_oh + offs_d[None, :]
        tl.store(o_ptrs, out.to(out_ptr.dtype.element_ty), mask=q_mask)


def _launch_config(
    head_dim: int, max_query_len: int, dtype: torch.dtype, quantized_v: bool, target: GPUTarget | None = None
) -> tuple[int, int, int, int]:
    """(BLOCK_M, BLOCK_N, num_warps, num_stages) on target (kernels/targets.py `device_target`; None on the CPU, which
    takes NVIDIA's) by fixed rules, so no autotuning runs at serving time. The one place the launch decides them, called
    by `paged_prefill_attention` and by the compile checks (tests/kernels/compile_variants.py).

    Measured on an H200 (Triton 3.6; 32 query / 8 kv heads; head_dim 128, and 64 agreeing):
    - V in bf16/fp16 (K either way): 64 x 64 tiles, 4 warps, 3 stages win at 2k-token prompts (many programs, two per
      SM, a short causal tail); from ~4k tokens 128 x 128 with 8 warps wins (fewer, longer programs).
    - V in int8/fp8: 64 x 128 tiles, 4 warps, 2 stages, 20-40% ahead of every other shape tried (the dequantized tile
      goes back through shared memory for the tensor cores; this shape keeps two programs per SM to hide that).
    Short query batches (chunk continuations, single tokens) shrink BLOCK_M to the smallest tile that holds them,
    >= 16 for tl.dot. float32 ("ieee" dots: the CPU/debug path, no tensor cores) uses small tiles. AMD (gfx942,
    gfx950): `AMD_PREFILL_TILES`, compiled, not measured. head_dim > 128 halves the tiles to fit shared memory: not
    measured either.
    """
    block_d = triton.next_power_of_2(head_dim)
    if dtype == torch.float32:
        block_m, block_n, num_warps, num_stages = 32, 32, 4, 2
    elif targets.is_amd(target):
        kind = "quantized_v" if quantized_v else "bf16_v"
        block_m, block_n, num_warps, num_stages = AMD_PREFILL_TILES[kind] if block_d <= 128 else (64, 32, 4, 1)
    elif block_d > 128:
        block_m, block_n, num_warps, num_stages = 64, 32, 4, 2
    elif quantized_v:
        block_m, block_n, num_warps, num_stages = 64, 128, 4, 2
    elif max_query_len >= 4096:
        block_m, block_n, num_warps, num_stages = 128, 128, 8, 3
    else:
        block_m, block_n, num_warps, num_stages = 64, 64, 4, 3
    block_m = min(block_m, max(16, triton.next_power_of_2(max_query_len)))
    return block_m, block_n, num_warps, num_stages


def paged_prefill_attention(
    query: torch.Tensor,
    layer: LayerKV,
    block_tables: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    context_lens: torch.Tensor,
    scale: float,
    max_query_len: int | None = None,
) -> torch.Tensor:
    """query:         [num_tokens, num_heads, head_dim], the new tokens of all sequences concatenated
    block_tables:  [num_seqs, max_blocks] int32
    cu_seqlens_q:  [num_seqs + 1] int32; sequence b's new tokens are query[cu_seqlens_q[b]:cu_seqlens_q[b+1]]
    context_lens:  [num_seqs] int32; all tokens of sequence b, new ones included (all already in the pool)
    max_query_len: the longest new-token count; pass it (the scheduler knows it) to save a device-to-host sync
    returns:       [num_tokens, num_heads, head_dim] in query's dtype

    As the reference, except that cu_seqlens_q's values are trusted (checking them would sync): they must split all
    num_tokens rows, with q_len_b <= context_len_b.
    """
    num_tokens, num_heads, head_dim = query.shape
    num_kv_heads = layer.num_kv_heads
    if num_heads % num_kv_heads != 0:
        raise ValueError(f"num_heads {num_heads} is not a multiple of num_kv_heads {num_kv_heads}")
    if head_dim != layer.head_dim:
        raise ValueError(f"query head_dim {head_dim} != pool head_dim {layer.head_dim}")
    num_seqs = context_lens.shape[0]
    if cu_seqlens_q.shape != (num_seqs + 1,):
        raise ValueError(f"cu_seqlens_q must be [num_seqs + 1 = {num_seqs + 1}], got {tuple(cu_seqlens_q.shape)}")
    if block_tables.shape[0] != num_seqs:
        raise ValueError(f"block_tables has {block_tables.shape[0]} rows for {num_seqs} sequences")
    if layer.k_format.has_scale != (layer.k_scale is not None) or layer.v_format.has_scale != (
        layer.v_scale is not None
    ):
        raise ValueError("layer scales do not match its formats")
    for name, cache in (("k_cache", layer.k_cache), ("v_cache", layer.v_cache)):
        if cache.stride(-1) != 1:
            raise ValueError(f"{name} must be contiguous in head_dim")
    if query.stride(-1) != 1:
        query = query.contiguous()
    out = torch.empty_like(query, memory_format=torch.contiguous_format)
    if num_tokens == 0 or num_seqs == 0:
        return out
    if max_query_len is None:
        max_query_len = int((cu_seqlens_q[1:] - cu_seqlens_q[:-1]).max().item())
    if max_query_len <= 0:
        return out

    quantized_v, target = layer.v_format.has_scale, targets.device_target(query.device)
    block_m, block_n, num_warps, num_stages = _launch_config(head_dim, max_query_len, query.dtype, quantized_v, target)
    block_tables = block_tables.to(torch.int32)
    # Unscaled formats pass their cache as a never-read stand-in pointer, with zero strides.
    k_scale = layer.k_scale if layer.k_scale is not None else layer.k_cache
    v_scale = layer.v_scale if layer.v_scale is not None else layer.v_cache
    k_scale_strides = layer.k_scale.stride() if layer.k_scale is not None else (0, 0, 0)
    v_scale_strides = layer.v_scale.stride() if layer.v_scale is not None else (0, 0, 0)
    grid = (triton.cdiv(max_query_len, block_m), num_seqs, num_heads)
    _paged_prefill_kernel[grid](
        query,
        out,
        layer.k_cache,
        layer.v_cache,
        k_scale,
        v_scale,
        block_tables,
        cu_seqlens_q.to(torch.int32),
        context_lens.to(torch.int32),
        scale * LOG2E,
        query.stride(0),
        query.stride(1),
        out.stride(0),
        out.stride(1),
        block_tables.stride(0),
        *layer.k_cache.stride()[:3],
        *layer.v_cache.stride()[:3],
        *k_scale_strides,
        *v_scale_strides,
        GROUP=num_heads // num_kv_heads,
        BLOCK_SIZE=layer.block_size,
        HEAD_DIM=head_dim,
        BLOCK_D=triton.next_power_of_2(head_dim),
        BLOCK_M=block_m,
        BLOCK_N=block_n,
        K_SCALED=layer.k_scale is not None,
        V_SCALED=layer.v_scale is not None,
        IEEE_DOT=query.dtype == torch.float32,
        OFFSETS_64=max(layer.k_cache.numel(), layer.v_cache.numel()) >= OFFSETS_64_FROM,
        num_warps=num_warps,
        num_stages=num_stages,
    )
    return out

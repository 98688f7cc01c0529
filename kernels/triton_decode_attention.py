"""paged_decode_attention, Triton: split-K flash decoding over the paged, quantized KV pool, GQA heads packed.

Same function as `paged_decode_attention_ref` (kernels/decode_attention.py). Two kernels:

1. `_decode_split_kernel`, grid (num_seqs, num_kv_heads, num_splits). A program takes one sequence, one KV head and
   one contiguous share of that sequence's context. It handles all the query heads that read this KV head at once
   (GQA packing): a [GROUP_PAD, head_dim] tile of queries against [BLOCK_N, head_dim] tiles of K with `tl.dot`, so
   the matrix units do the work and each K/V byte is read once per KV head, not once per query head. Online softmax in
   float32; it writes its unnormalized partial output, running max and sum to a workspace.
2. `_decode_reduce_kernel`, grid (num_seqs, num_heads), combines the splits. With one split the first kernel writes
   the output directly and this one is not launched.

Quantized K/V are dequantized exactly and cheaply: the int8/fp8 values convert exactly to the dot's 16-bit input type,
and the per token-head scales are applied to the [GROUP_PAD, BLOCK_N] scores (K) and folded into the probabilities
(V) instead of to the [BLOCK_N, head_dim] tiles: q . (k * s) = (q . k) * s, and sum_n p_n (v_n * s_n) =
sum_n (p_n * s_n) v_n.

CUDA graphs: the grid and the split count depend only on shapes and on the optional `max_context_len` hint, never on
the values in context_lens; each program finds its share of its sequence on the device. Splits past the end of a
sequence write an empty partial (max -inf, sum 0) that the reduce skips. No host synchronization anywhere.
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl
from triton.backends.compiler import GPUTarget

from kernels import pdl, targets
from kernels.decode_attention import NewToken
from kernels.rotary import check_rotary_args
from kernels.store_kv import check_store_kv_args
from kernels.triton_helpers import (
    quantize_constexprs,
    rope_factors,
    rotate_store_token,
    rotated_rows,
    scale_args,
    to_dot,
)
from kvstore.formats import KVFormat, LayerKV

# Split heuristic (see `decode_num_splits`). Programs wanted per SM/CU: enough resident programs for the loads in
# flight to saturate HBM; each split adds a [group, head_dim] float32 partial, negligible next to its K/V bytes.
# On an H200 (Triton 3.6, 32/8 heads, head_dim 128, 4k context, bf16 and int8) the count this gives was within ~10% of
# the best forced count from batch 1 to 128, and 1.3-1.8x faster than one split at batch 12.
PROGRAMS_PER_SM = 4
# A split reads at least this many tokens, so that its fixed cost (q load, partial write, reduce) stays small. 128
# (one tile): at batch 1 x 1k, 8 splits of one tile took 5.8 us against 8.1 us for 4 splits of two (H200, int8).
MIN_TOKENS_PER_SPLIT = 128
# Upper bound of the split count (the reduce kernel holds all splits of one head in one tile).
MAX_SPLITS = 64
# SM count assumed when not on a GPU (the interpreter): an H100's.
DEFAULT_NUM_SMS = 132

# Tokens per K/V tile: a multiple of the block size (a tile covers whole blocks), at least 16 for tl.dot. 128 against
# 64 (4 warps, H200): int8/fp8 KV 23-29% faster at batch 256 x 4k, bf16 the same; 256 spills registers.
TILE_TOKENS = 128

# Tiles, warps and stages on AMD (compiled, not measured: no MI300X has run this kernel), per arch and KV kind
# ("bf16": no side scaled; "quantized": int8 or fp8 on either side). NVIDIA's 128-token tiles with 4 waves want more
# than the 512 registers a CDNA lane has (256 VGPRs + up to 256 AGPRs: 1 wave/SIMD, int8 and fp8 spilling 850-1300
# bytes a lane). tests/kernels/compile_gfx942.py, Triton 3.6, every variant (plain i32 arguments; as launched on the
# 8B shape it is fewer): gfx942 bf16 at 64 tokens 233-235 VGPRs + 16 AGPRs, 2 waves/SIMD (32 tokens: 3); int8 and fp8
# at 32 tokens and 1 stage 188-222 + 8, 2 waves (2 stages: 1 wave for some; 64 tokens: 256 + 72-130, 1 wave). gfx950
# bf16 at 64 tokens holds 1 wave (256 + 24), at 32 tokens 2. One stage: Triton's AMD pipeliner then keeps no K/V
# tile in LDS across iterations, the waves (2-3 a SIMD) hide each other's loads instead.
AMD_DECODE_TILES: dict[tuple[str, str], dict[str, int]] = {
    ("gfx942", "bf16"): {"block_n": 64, "num_warps": 4, "num_stages": 1},
    ("gfx942", "quantized"): {"block_n": 32, "num_warps": 4, "num_stages": 1},
    ("gfx950", "bf16"): {"block_n": 32, "num_warps": 4, "num_stages": 1},
    ("gfx950", "quantized"): {"block_n": 32, "num_warps": 4, "num_stages": 1},
}

# Launch choices for int8/fp8 KV on NVIDIA GPUs (bench/tune_decode_attention.py, H200, batch 32 x 4k and 64 x 1k).
# Left alone, ptxas gives the kernel 186-255 registers: 2 programs an SM, too few K/V bytes in flight (0.56 / 0.50 of
# copy bandwidth). Capped at 128 registers it does not spill (ptxas -v) and 4 programs fit; 2 programs an SM worth of
# splits and 2 stages was then best (0.70 / 0.68). With the scales loaded beside the block ids (see the loop), 3
# stages: 0.805 / 0.767 against 0.764 / 0.734 with 2 (2026-12-03). bf16 KV reads twice the bytes per tile and keeps
# the defaults.
# Triton 3.6's pipeliner gives this loop one K/V buffer at 3 or 4 stages: each tile's loads are issued after the
# previous tile's dots and waited for in full (sm_90 TTGIR: async_wait num = 0), so a program never overlaps its own
# loads with its math; 5 or 6 stages give two buffers (the next tile's loads in flight during this one's dots), 7 three.
QUANTIZED_NVIDIA_TUNING = {"maxnreg": 128, "programs_per_sm": 2}
# Under the 128-register cap two or three buffers measured slower (bench/tune_decode_attention.py's sixth run: 0.64 /
# 0.61 of copy bandwidth at batch 32 x 4k against 0.79 with 3 stages). Read at each call
# (`model_bench --sweep kernels.triton_decode_attention.QUANTIZED_NUM_STAGES=3,5`).
QUANTIZED_NUM_STAGES = 3
# The 128-register cap is there to fit 4 programs an SM. It is dropped, and a program of two tiles or more gets two
# K/V buffers (5 stages), when the launch has at most 2 programs an SM (batch 1: 8 KV heads x the splits) or when each
# program reads 16 tiles or more and there are at most 4 programs an SM (batch 32 x 4k: 2 splits of 16 tiles; larger
# launches, as batch 128 x 8k, were not measured so and keep the cap): H200, int8, one process each
# (bench/results/tune_decode_attention.json, 2026-12-04, seventh run and a repeat): batch 32 x 4k 0.817 / 0.810
# against 0.795 / 0.792 capped at 3 stages (5 stages capped: 0.643; uncapped at 3: 0.661); batch 1 x 1k (one tile a
# program, 3 stages) 5.2 against 5.6 us; batch 1 x 8k (kernel_bench) 0.395 against 0.365. Batch 64 x 1k (512 programs
# of 8 tiles) keeps the cap: 0.759 against 0.742 uncapped at 5 stages. Read at each call, for in-process A/B.
FEW_PROGRAMS_UNCAPPED = True

# int8 KV with 16-bit queries (`to_dot`, `_pairs_to_dot`): K reaches the dot biased by 1152 (no subtraction per
# value), V as int16 pairs of dims (one ldmatrix.trans per 8x8 tile instead of one byte load per value). sm_90 SASS of
# the loop, 128-token tiles, 4 warps, 128 registers: 1380 -> 960 instructions a tile. H200, int8, pairs on / off in
# one process: batch 32 x 4k 0.83 / 0.69 of copy bandwidth, 64 x 1k 0.78 / 0.67 (no difference before the scales
# moved to the head of the tile: the loads were the bottleneck then). Module switches for in-process A/B
# (`model_bench --sweep kernels.triton_decode_attention.V_PAIRS=1,0`); tuning "pairs"/"biased" per call.
K_BIASED = True
V_PAIRS = True

# The new token's rotary and K/V store inside the attention kernel (given a `NewToken`; kernels/ops.py's
# rotary_store_decode_attention), instead of the rotary_store_kv kernel before it: read at each call, for in-process
# A/B (`model_bench --sweep kernels.triton_decode_attention.FUSED_ROTARY=1,0`).
# Tried and dropped (H200, 8B shape, int8 KV, 1k context, one process, fraction of the floor): the splits combined by
# the last split program of each (sequence, kv head) to finish (an arrival counter; CUTLASS's semaphore pattern)
# instead of the reduce kernel after it: batch 1 0.871 / 0.872 against 0.910 / 0.910 with the reduce kernel, batch
# 16 0.753 against 0.768. The reduce kernel, launched early (PDL), costs less than one program's serial tail.
FUSED_ROTARY = True
# With the new token's store inside (ROTARY), the sequence's length, position and rotary factors are read before the
# PDL wait: none of them is written by the kernel just before this one (the qkv projection), and every kernel before
# that one has completed once this one runs (it launches when the projection, past its own wait, triggers). That takes
# the position -> cos/sin chain of loads off the path after the wait. Read at each call.
# Tried and dropped (H200, one call, kernel_bench against the tree before): the first K/V tile peeled from the loop and
# read before the wait too, the new token's row read again after its store: rotary attention batch 64 x 1k 0.622 of
# copy bandwidth against 0.717, batch 1 243 against 309 GB/s (plain loads of a tile outside Triton's pipelined loop,
# and 80-144 bytes of register spills against 20-36). Also dropped (2026-12-04, one H200, in one process, on / off
# alternating): the first tile's block ids read before the wait and its K/V rows and scales asked of L2 then
# (prefetch.global.L2): decode batch 1 x 1k 3.972 / 3.970 ms a step against 3.967 / 3.965, batch 64 5.995 / 6.011
# against 5.985 / 6.006 - no gain. And 64-token tiles with splits of 64 tokens at batch 1 (16 splits a KV head
# instead of 8): 4.026 / 4.025 ms against 3.967 / 3.967.
EARLY_READS = True

# The split reduce lets the next kernel launch before its own wait instead of after it. Without splits (a short
# context) the attention kernel triggers at its start, so the o_proj GEMV after it launches during the attention and
# reads its first weight chunk before its wait (kernels/triton_gemv.py PRELOAD); with the reduce between them, o_proj
# launched only once the attention had completed (the reduce triggered after its wait). H200, batch-1 decode, one
# process: 16-token context (no splits) 3.944 / 3.950 ms a step, 128 tokens (2 splits + reduce) 3.983 / 3.981.
# Safe: o_proj reads nothing but its constant weight before its wait, which returns once the reduce has completed,
# and the reduce completes only after its own wait for the attention. (Every small kernel triggering first measured
# no faster, before the GEMV preload existed: kernels/pdl.py.) Measured on / off alternating in one process (H200,
# 8B shape, int8 KV, 1k context; bench/results/tune_settings_2026-12-04m.json): batch 1 3.981 / 4.005 and 3.982 /
# 4.003 ms a step; batch 8 4.833 / 4.825, 4.829 / 4.831; batch 32 5.637 / 5.650, 5.664 / 5.652 (no difference there:
# the skinny GEMM preloads nothing). Read at each call
# (`model_bench --sweep kernels.triton_decode_attention.REDUCE_TRIGGER_FIRST=1,0 --batches 1,8`).
REDUCE_TRIGGER_FIRST = True
# Tried and dropped: the split kernel letting the next kernel launch at its very start, before its wait, so that the
# reduce's and o_proj's programs launch during the qkv projection's tail. Slower at batch 1 and no different at 64
# (H200, one process, on / off alternating, bench/results/tune_settings_2026-12-04p.json): batch 1 3.893 / 3.880 and
# 3.887 / 3.863 ms a step, batch 64 5.884 / 5.892 and 5.887 / 5.905.

_LOG2E = 1.4426950408889634


@triton.jit
def _pairs_to_dot(x, CONVERT: tl.constexpr):
    """[BLOCK_N, HEAD_DIM_PAD // 2] int16 holding two int8 values of adjacent dims each (the even dim in the low byte)
    -> two fp16 tiles of the same shape: the even dims and the odd dims, each value + 1152 (`to_dot`'s BIASED).

    Why pairs: P @ V reduces over tokens, so the dot wants V with tokens as its inner (k) dimension, while the pool
    stores each token's dims contiguously. Moving int8 V into that layout through shared memory costs one byte load
    per value (no 8-bit transposed ldmatrix on sm_80/sm_90); as 16-bit elements it is one ldmatrix.trans per 8x8 tile,
    and the dot is split in two: P @ V[:, 0::2] and P @ V[:, 1::2]. Same bias trick as `to_dot`.
    """
    if CONVERT == 2:
        return tl.inline_asm_elementwise(
            asm="""
            {
            .reg .b32 t, e;
            xor.b32 t, $2, 0x80808080;
            mov.b32 e, 0x64646464;
            prmt.b32 $0, t, e, 0x4240;
            prmt.b32 $1, t, e, 0x4341;
            }
            """,
            constraints="=r,=r,r",
            args=[x],
            dtype=(tl.float16, tl.float16),
            is_pure=True,
            pack=2,
        )
    else:
        u = x.to(tl.uint16, bitcast=True)
        even = ((u & 0xFF) ^ 0x80) | 0x6400
        odd = ((u >> 8) ^ 0x80) | 0x6400
        return even.to(tl.float16, bitcast=True), odd.to(tl.float16, bitcast=True)


@triton.jit
def _store_head_rows(row_ptrs, stride_d, acc, acc_even, acc_odd, mask_g, offs_d, mask_d, offs_h, mask_h,
                     V_PAIRS: tl.constexpr):  # fmt: skip
    """Store [GROUP_PAD, head_dim] rows at row_ptrs + dim * stride_d (row_ptrs [GROUP_PAD, 1]): acc, or with V_PAIRS
    its even dims (acc_even) and odd dims (acc_odd). tl.store casts to the destination's dtype."""
    if V_PAIRS:
        mask = mask_g[:, None] & mask_h[None, :]
        even_ptrs = row_ptrs + (2 * offs_h)[None, :] * stride_d
        tl.store(even_ptrs, acc_even, mask=mask)
        tl.store(even_ptrs + stride_d, acc_odd, mask=mask)
    else:
        tl.store(row_ptrs + offs_d[None, :] * stride_d, acc, mask=mask_g[:, None] & mask_d[None, :])


@triton.jit
def _decode_split_kernel(
    q_ptr,  # [num_seqs, num_heads, head_dim]
    k_cache_ptr,  # [num_blocks, block_size, num_kv_heads, head_dim]
    v_cache_ptr,
    k_scale_ptr,  # [num_blocks, block_size, num_kv_heads] float32 (any tensor if K is unscaled)
    v_scale_ptr,
    block_tables_ptr,  # [num_seqs, max_blocks] int32
    context_lens_ptr,  # [num_seqs] int32
    out_ptr,  # [num_seqs, num_heads, head_dim]; written only when NUM_SPLITS_IS_ONE
    ws_acc_ptr,  # [num_seqs, num_heads, num_splits, head_dim] float32: unnormalized partial outputs
    ws_max_ptr,  # [num_seqs, num_heads, num_splits] float32: running max of the scores, log2 domain
    ws_sum_ptr,  # [num_seqs, num_heads, num_splits] float32: sum of exp2(score - max)
    qk_scale,  # softmax scale * log2(e)
    num_heads,
    num_splits,
    stride_q_s,
    stride_q_h,
    stride_q_d,
    stride_kc_b,
    stride_kc_s,
    stride_kc_h,
    stride_kc_d,
    stride_vc_b,
    stride_vc_s,
    stride_vc_h,
    stride_vc_d,
    stride_ks_b,
    stride_ks_s,
    stride_ks_h,
    stride_vs_b,
    stride_vs_s,
    stride_vs_h,
    stride_bt_s,
    stride_o_s,
    stride_o_h,
    stride_o_d,
    # ROTARY (the new token's rotary and K/V store done here, `NewToken`): query_ptr holds the unrotated query
    positions_ptr,  # [num_seqs]
    k_new_ptr,  # [num_seqs, num_kv_heads, head_dim] the new token's unrotated key
    v_new_ptr,
    cos_sin_ptr,  # [max_positions, rot_dim] = cat(cos, sin)
    slot_mapping_ptr,  # [num_seqs] int64, -1 for batch padding
    k_pool_ptr,  # the pool as stored (v_cache_ptr may be its int16 view), for the store
    v_pool_ptr,
    stride_kn_s,
    stride_kn_h,
    stride_vn_s,
    stride_vn_h,
    stride_cache,
    stride_kp_b,
    stride_kp_s,
    stride_kp_h,
    stride_kp_d,
    stride_vp_b,
    stride_vp_s,
    stride_vp_h,
    stride_vp_d,
    GROUP: tl.constexpr,
    GROUP_PAD: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    HEAD_DIM_PAD: tl.constexpr,
    BLOCK_SIZE: tl.constexpr,
    BLOCK_N: tl.constexpr,
    K_SCALED: tl.constexpr,
    V_SCALED: tl.constexpr,
    K_DOT_DTYPE: tl.constexpr,
    V_DOT_DTYPE: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
    NUM_SPLITS_IS_ONE: tl.constexpr,
    CONVERT: tl.constexpr,
    K_BIASED: tl.constexpr,  # int8 K reaches the dot as k + 1152 (`to_dot`)
    V_PAIRS: tl.constexpr,  # v_cache_ptr is the int8 pool viewed as int16 (strides in int16 elements): `_pairs_to_dot`
    ROTARY: tl.constexpr,
    HALF: tl.constexpr,  # ROTARY: half the rotated dims
    K_MODE: tl.constexpr,  # ROTARY: the store's quantization (kernels/triton_helpers.py, quantize_constexprs)
    V_MODE: tl.constexpr,
    K_QMAX: tl.constexpr,
    V_QMAX: tl.constexpr,
    K_INV_QMAX: tl.constexpr,
    V_INV_QMAX: tl.constexpr,
    RECIPROCAL: tl.constexpr,
    FP8_MIN_NORMAL_EXP: tl.constexpr,
    FP8_MANTISSA_BITS: tl.constexpr,
    EARLY_READS: tl.constexpr,
    PDL: tl.constexpr,
):
    if not (ROTARY and EARLY_READS):
        pdl.enter(PDL)  # nothing is read before the previous kernel is done; the next may launch (kernels/pdl.py)
    seq = tl.program_id(0)
    kv_head = tl.program_id(1)
    split = tl.program_id(2)

    # This split's share [start, end) of the sequence: equal shares, each a whole number of tiles, so that tiles start
    # on block boundaries. Computed here from the sequence's length, so the grid does not depend on it.
    context_len = tl.load(context_lens_ptr + seq)
    split_len = tl.cdiv(tl.cdiv(context_len, num_splits), BLOCK_N) * BLOCK_N
    start = split * split_len
    end = tl.minimum(start + split_len, context_len)

    offs_g = tl.arange(0, GROUP_PAD)
    offs_d = tl.arange(0, HEAD_DIM_PAD)
    offs_n = tl.arange(0, BLOCK_N)
    mask_g = offs_g < GROUP
    mask_d = offs_d < HEAD_DIM
    # Query heads kv_head * GROUP .. + GROUP - 1 read this KV head (HF's repeat_kv order).
    heads = kv_head * GROUP + offs_g
    mask_gd = mask_g[:, None] & mask_d[None, :]

    # [GROUP_PAD, HEAD_DIM_PAD]; padded rows and columns are 0.
    if ROTARY:
        # Every program rotates its query heads (a few hundred values); the one whose share holds the new token
        # rotates its key and stores it and the value, with store_kv's quantization, before its loop reads them back.
        lo, c_lo, c_hi = rope_factors(positions_ptr, seq, cos_sin_ptr, stride_cache, offs_d, HALF)
        if EARLY_READS:
            # the length, position and rotary factors above were read before the wait (`EARLY_READS`)
            pdl.enter(PDL)
        q = rotated_rows(q_ptr + seq * stride_q_s, stride_q_h, tl.where(mask_g, heads, num_heads), num_heads, offs_d,
                         lo, c_lo, c_hi, 2 * HALF, HALF, HEAD_DIM).to(K_DOT_DTYPE)  # fmt: skip
        if (context_len - 1 >= start) & (context_len - 1 < end):
            # kv heads [kv_head, kv_head + 1), as a 2-wide vector (the second masked off)
            rotate_store_token(k_new_ptr + seq * stride_kn_s, v_new_ptr + seq * stride_vn_s, stride_kn_h,
                               stride_vn_h, tl.load(slot_mapping_ptr + seq).to(tl.int64), kv_head + tl.arange(0, 2),
                               kv_head + 1, BLOCK_SIZE, offs_d, lo, c_lo, c_hi, k_pool_ptr, v_pool_ptr, k_scale_ptr,
                               v_scale_ptr, stride_kp_b, stride_kp_s, stride_kp_h, stride_kp_d, stride_vp_b,
                               stride_vp_s, stride_vp_h, stride_vp_d, stride_ks_b, stride_ks_s, stride_ks_h,
                               stride_vs_b, stride_vs_s, stride_vs_h, HALF, HEAD_DIM, K_MODE, V_MODE, K_QMAX, V_QMAX,
                               K_INV_QMAX, V_INV_QMAX, RECIPROCAL, FP8_MIN_NORMAL_EXP, FP8_MANTISSA_BITS)  # fmt: skip
        # The threads that stored are not the ones that load: the CTA's stores are visible to it after a barrier.
        tl.debug_barrier()
    else:
        q = (
            tl.load(
                q_ptr + seq * stride_q_s + heads[:, None] * stride_q_h + offs_d[None, :] * stride_q_d,
                mask=mask_gd,
                other=0.0,
            )
            .to(tl.float32)
            .to(K_DOT_DTYPE)
        )  # through float32: exact, and the interpreter has no bf16 -> fp16 cast
    if K_BIASED:
        # q . (k + 1152) = q . k + 1152 * sum(q), the sum of the fp16 values the dot reads
        q_bias = 1152.0 * tl.sum(q.to(tl.float32), axis=1)  # [GROUP_PAD]

    # A tile starts on a block boundary and covers BLOCK_N // BLOCK_SIZE whole blocks, so token n of a tile is at
    # offset n % BLOCK_SIZE of the tile's (n // BLOCK_SIZE)-th block. Addresses are built in the loop from [BLOCK_N]
    # row offsets plus one [HEAD_DIM_PAD] column offset: a hoisted [BLOCK_N, HEAD_DIM_PAD] tensor of 64-bit pointers
    # costs 256 registers a thread at 128 x 128 and spilled ~2 KB a thread (ptxas -v, sm_90).
    block_of_token = offs_n // BLOCK_SIZE  # [BLOCK_N]
    slot_in_block = offs_n % BLOCK_SIZE  # [BLOCK_N]
    table_ptr = block_tables_ptr + seq.to(tl.int64) * stride_bt_s
    k_row_in_block = kv_head * stride_kc_h + slot_in_block * stride_kc_s  # [BLOCK_N]
    v_row_in_block = kv_head * stride_vc_h + slot_in_block * stride_vc_s
    k_col = offs_d * stride_kc_d  # [HEAD_DIM_PAD]
    v_col = offs_d * stride_vc_d
    k_scale_in_block = kv_head * stride_ks_h + slot_in_block * stride_ks_s  # [BLOCK_N]
    v_scale_in_block = kv_head * stride_vs_h + slot_in_block * stride_vs_s

    # V_PAIRS: column j of the int16 view holds dims 2j and 2j + 1
    offs_h = tl.arange(0, HEAD_DIM_PAD // 2)
    mask_h = offs_h < HEAD_DIM // 2
    v_pair_col = offs_h * stride_vc_d

    m_i = tl.full([GROUP_PAD], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([GROUP_PAD], dtype=tl.float32)
    acc = tl.zeros([GROUP_PAD, HEAD_DIM_PAD], dtype=tl.float32)
    # V_PAIRS: the even and the odd dims of the output
    acc_even = tl.zeros([GROUP_PAD, HEAD_DIM_PAD // 2], dtype=tl.float32)
    acc_odd = tl.zeros([GROUP_PAD, HEAD_DIM_PAD // 2], dtype=tl.float32)
    p_sum = tl.zeros([GROUP_PAD], dtype=tl.float32)  # V_PAIRS: sum of the fp16 probabilities, for the bias

    # Every tile holds at least one valid token, so m_i is finite after the first one (no -inf - -inf = NaN).
    for tile_start in range(start, end, BLOCK_N):
        mask_n = tile_start + offs_n < end
        # [BLOCK_N] block id of each token (repeats within a block; the loads coalesce)
        blocks = tl.load(table_ptr + tile_start // BLOCK_SIZE + block_of_token, mask=mask_n, other=0).to(tl.int64)
        # The scales are loaded with the block ids, before the dots. Loaded each just before its use, the same
        # kernel read 0.70 of copy bandwidth at best (H200, int8, batch 32 x 4k, any stage count); loaded here,
        # 0.805 with 3 stages (two calls on two H200s of one session).
        if K_SCALED:
            k_scale = tl.load(k_scale_ptr + blocks * stride_ks_b + k_scale_in_block, mask=mask_n, other=0.0)
        if V_SCALED:
            v_scale = tl.load(v_scale_ptr + blocks * stride_vs_b + v_scale_in_block, mask=mask_n, other=0.0)
        mask_nd = mask_n[:, None] & mask_d[None, :]

        # [BLOCK_N, HEAD_DIM_PAD]
        k = to_dot(
            tl.load(
                k_cache_ptr + (blocks * stride_kc_b + k_row_in_block)[:, None] + k_col[None, :], mask=mask_nd, other=0.0
            ),
            K_DOT_DTYPE,
            CONVERT,
            K_BIASED,
        )
        # [GROUP_PAD, BLOCK_N]
        scores = tl.dot(q, tl.trans(k), input_precision=INPUT_PRECISION)
        if K_BIASED:
            scores = scores - q_bias[:, None]
        if K_SCALED:
            scores = scores * k_scale[None, :]
        scores = tl.where(mask_n[None, :], scores * qk_scale, float("-inf"))

        m_new = tl.maximum(m_i, tl.max(scores, axis=1))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(scores - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, axis=1)

        if V_SCALED:
            p = p * v_scale[None, :]
        if V_PAIRS:
            v_rows = v_cache_ptr + (blocks * stride_vc_b + v_row_in_block)[:, None]
            v_even, v_odd = _pairs_to_dot(
                tl.load(v_rows + v_pair_col[None, :], mask=mask_n[:, None] & mask_h[None, :], other=0), CONVERT
            )
            p16 = p.to(tl.float16)
            p_sum = p_sum * alpha + tl.sum(p16.to(tl.float32), axis=1)
            acc_even = acc_even * alpha[:, None] + tl.dot(p16, v_even)
            acc_odd = acc_odd * alpha[:, None] + tl.dot(p16, v_odd)
        else:
            v = to_dot(
                tl.load(
                    v_cache_ptr + (blocks * stride_vc_b + v_row_in_block)[:, None] + v_col[None, :],
                    mask=mask_nd,
                    other=0.0,
                ),
                V_DOT_DTYPE,
                CONVERT,
            )
            acc = acc * alpha[:, None] + tl.dot(p.to(V_DOT_DTYPE), v, input_precision=INPUT_PRECISION)
        m_i = m_new

    if V_PAIRS:
        # sum_n p_n (v_n + 1152) - 1152 * sum_n p_n
        acc_even = acc_even - 1152.0 * p_sum[:, None]
        acc_odd = acc_odd - 1152.0 * p_sum[:, None]
    if NUM_SPLITS_IS_ONE:
        # An empty sequence (batch padding, context_len 0) has l_i = 0 and acc = 0: its output is 0, as the reference.
        inv_l = 1.0 / tl.where(l_i > 0.0, l_i, 1.0)[:, None]
        out_rows = out_ptr + seq * stride_o_s + heads[:, None] * stride_o_h
        _store_head_rows(out_rows, stride_o_d, acc * inv_l, acc_even * inv_l, acc_odd * inv_l, mask_g, offs_d, mask_d,
                         offs_h, mask_h, V_PAIRS)  # fmt: skip
    else:
        # An empty split stores acc 0, max -inf, sum 0 (the initial values): the reduce gives it weight 0.
        row = (seq * num_heads + heads) * num_splits + split  # [GROUP_PAD]
        _store_head_rows(ws_acc_ptr + row[:, None] * HEAD_DIM, 1, acc, acc_even, acc_odd, mask_g, offs_d, mask_d,
                         offs_h, mask_h, V_PAIRS)  # fmt: skip
        tl.store(ws_max_ptr + row, m_i, mask=mask_g)
        tl.store(ws_sum_ptr + row, l_i, mask=mask_g)


@triton.jit
def _decode_reduce_kernel(
    out_ptr,  # [num_seqs, num_heads, head_dim]
    ws_acc_ptr,  # [num_seqs, num_heads, num_splits, head_dim] float32
    ws_max_ptr,  # [num_seqs, num_heads, num_splits] float32
    ws_sum_ptr,  # [num_seqs, num_heads, num_splits] float32
    num_heads,
    num_splits,
    stride_o_s,
    stride_o_h,
    stride_o_d,
    HEAD_DIM: tl.constexpr,
    HEAD_DIM_PAD: tl.constexpr,
    SPLITS_PAD: tl.constexpr,
    TRIGGER_FIRST: tl.constexpr,  # `REDUCE_TRIGGER_FIRST`
    PDL: tl.constexpr,
):
    if TRIGGER_FIRST:
        pdl.trigger(PDL)  # the next kernel (o_proj) may launch now and read its weight during the attention
        pdl.wait(PDL)  # nothing is read before the previous kernel is done (kernels/pdl.py)
    else:
        pdl.enter(PDL)  # nothing is read before the previous kernel is done; the next kernels may launch
    seq = tl.program_id(0)
    head = tl.program_id(1)
    offs_s = tl.arange(0, SPLITS_PAD)
    offs_d = tl.arange(0, HEAD_DIM_PAD)
    mask_s = offs_s < num_splits
    mask_d = offs_d < HEAD_DIM
    rows = (seq * num_heads + head) * num_splits + offs_s  # [SPLITS_PAD]

    m = tl.load(ws_max_ptr + rows, mask=mask_s, other=float("-inf"))
    l_split = tl.load(ws_sum_ptr + rows, mask=mask_s, other=0.0)
    m_max = tl.max(m, axis=0)
    # All splits empty (context_len 0): any finite reference point; every weight is then exp2(-inf) = 0.
    m_ref = tl.where(m_max == float("-inf"), 0.0, m_max)
    weights = tl.exp2(m - m_ref)  # [SPLITS_PAD]; 0 for empty and padded splits
    total = tl.sum(l_split * weights, axis=0)

    # [SPLITS_PAD, HEAD_DIM_PAD]
    acc = tl.load(ws_acc_ptr + rows[:, None] * HEAD_DIM + offs_d[None, :], mask=mask_s[:, None] & mask_d[None, :],
                  other=0.0)  # fmt: skip
    out = tl.sum(acc * weights[:, None], axis=0) / tl.where(total > 0.0, total, 1.0)
    tl.store(out_ptr + seq * stride_o_s + head * stride_o_h + offs_d * stride_o_d, out.to(out_ptr.dtype.element_ty),
             mask=mask_d)  # fmt: skip


@functools.cache
def _num_sms(device: torch.device) -> int:
    if device.type == "cuda":
        # SMs on NVIDIA, CUs on ROCm. Host-only query, cached: fine during graph capture.
        return torch.cuda.get_device_properties(device).multi_processor_count
    return DEFAULT_NUM_SMS


def decode_num_splits(
    num_seqs: int, num_kv_heads: int, max_context_len: int, num_sms: int, programs_per_sm: int | None = None
) -> int:
    """How many splits of the context to use: from shapes and an upper bound of the context only (graph-safe).

    Enough (sequence, kv head, split) programs to give every SM PROGRAMS_PER_SM of them, but no split shorter than
    MIN_TOKENS_PER_SPLIT tokens of the longest possible context. Decreases smoothly with the batch (a large batch gets
    1 split): no cliff where a long-context batch of a dozen sequences falls back to one program per (seq, kv head).
    """
    programs = max(num_seqs * num_kv_heads, 1)
    by_occupancy = -(-(programs_per_sm or PROGRAMS_PER_SM) * num_sms // programs)
    by_length = -(-max(max_context_len, 1) // MIN_TOKENS_PER_SPLIT)
    return max(1, min(by_occupancy, by_length, MAX_SPLITS))


def _dot_dtypes(query: torch.dtype, layer: LayerKV) -> tuple[tl.dtype, tl.dtype, str | None]:
    """The input dtypes of the two dots (q.K^T, p.V) and their input precision.

    A float32 query or float32 KV (tests, the CPU): float32 with IEEE products, never tf32, to match the float32
    reference. Otherwise an int8/fp8 side computes in fp16: int8 and e4m3 values are exact in fp16, int8 converts
    with integer ops (`to_dot`) and e4m3 with the hardware's conversion; q goes to fp16 too (exact unless
    |q| > 65504) and the probabilities keep 3 more bits than in bf16. A 16-bit side computes in its storage dtype.
    """
    if query not in (torch.float32, torch.float16, torch.bfloat16):
        raise ValueError(f"query dtype {query} not supported (float32, float16, bfloat16)")
    if query == torch.float32 or torch.float32 in (layer.k_cache.dtype, layer.v_cache.dtype):
        return tl.float32, tl.float32, "ieee"

    def side(fmt: KVFormat) -> tl.dtype:
        if fmt.has_scale:
            return tl.float16
        return tl.bfloat16 if fmt is KVFormat.BF16 else tl.float16

    return side(layer.k_format), side(layer.v_format), None


def decode_launch(
    target: GPUTarget | None,
    k_format: KVFormat,
    v_format: KVFormat,
    head_dim: int,
    block_size: int,
    num_seqs: int,
    num_kv_heads: int,
    max_context_len: int,
    num_sms: int,
    num_splits: int | None = None,
    tuning: dict | None = None,
) -> dict:
    """The launch config of `_decode_split_kernel` on target (kernels/targets.py `device_target`; None on the CPU):
    num_splits, block_n (tokens per K/V tile), num_warps, convert (`to_dot`), num_stages and maxnreg where set (else
    Triton's defaults), and the other `tuning` overrides given (biased, pairs). The one place the launch decides them,
    called by `paged_decode_attention` and by the compile checks (tests/kernels/compile_variants.py), so that what
    they compile is what would run.

    NVIDIA: 128-token tiles, 4 warps; int8/fp8 KV with `QUANTIZED_NVIDIA_TUNING` and `QUANTIZED_NUM_STAGES`, uncapped
    where `FEW_PROGRAMS_UNCAPPED` says. AMD: `AMD_DECODE_TILES` of its arch (compiled, not measured). The CPU: NVIDIA's
    tile, no stages or cap (the interpreter ignores them)."""
    quantized = k_format.has_scale or v_format.has_scale
    capped = targets.is_nvidia(target) and quantized
    defaults: dict = {"num_warps": 4}
    tile_tokens = TILE_TOKENS
    if capped:
        defaults |= {**QUANTIZED_NVIDIA_TUNING, "num_stages": QUANTIZED_NUM_STAGES}
    elif targets.is_amd(target):
        kind = "quantized" if quantized else "bf16"
        amd = dict(AMD_DECODE_TILES.get((str(target.arch), kind), AMD_DECODE_TILES[("gfx942", kind)]))
        tile_tokens = amd.pop("block_n")
        defaults |= amd
    given = tuning or {}
    tuning = {**defaults, **given}
    if num_splits is None:
        num_splits = tuning.get("num_splits")
    if num_splits is None:
        num_splits = decode_num_splits(num_seqs, num_kv_heads, max_context_len, num_sms, tuning.get("programs_per_sm"))
    num_splits = min(num_splits, MAX_SPLITS)

    head_dim_pad = max(16, triton.next_power_of_2(head_dim))
    block_n = max(block_size, tuning.get("block_n", tile_tokens if head_dim_pad <= 128 else max(16, tile_tokens // 2)))
    tiles = triton.cdiv(triton.cdiv(max_context_len, num_splits), block_n)
    programs_per_sm = num_seqs * num_kv_heads * num_splits / num_sms
    if capped and FEW_PROGRAMS_UNCAPPED and (programs_per_sm <= 2 or (tiles >= 16 and programs_per_sm <= 4)):
        # `FEW_PROGRAMS_UNCAPPED`: no register cap; two K/V buffers (5 stages) for a program of two tiles or more.
        tuning = {**defaults, "maxnreg": 0, "num_stages": 5 if tiles >= 2 else QUANTIZED_NUM_STAGES, **given}
    out = {k: v for k, v in tuning.items() if k not in ("num_stages", "maxnreg") or v}
    return out | {"num_splits": num_splits, "block_n": block_n, "convert": tuning.get("convert", 2 if
                  targets.is_nvidia(target) else 1)}  # fmt: skip


def paged_decode_attention(
    query: torch.Tensor,
    layer: LayerKV,
    block_tables: torch.Tensor,
    context_lens: torch.Tensor,
    scale: float,
    num_splits: int | None = None,
    max_context_len: int | None = None,
    tuning: dict | None = None,
    new: NewToken | None = None,
) -> torch.Tensor:
    """Attention of each sequence's query over its first context_lens[b] cached tokens (which include the query's own
    K/V, stored beforehand). Same contract as `paged_decode_attention_ref`; with `new`, as
    `rotary_store_decode_attention_ref`: the query is unrotated, and the new token's K/V are rotated and stored by
    this kernel (the same bits as kernels/triton_rotary_store_kv.py) before it reads them.

    query:           [num_seqs, num_heads, head_dim]; num_heads a multiple of num_kv_heads (query head h reads kv
                     head h // (num_heads // num_kv_heads))
    block_tables:    [num_seqs, max_blocks] int32
    context_lens:    [num_seqs] int32, each <= max_blocks * block_size; 0 (batch padding) gives a zero output
    num_splits:      force the split count (tests, tuning); default from `decode_num_splits`
    max_context_len: an upper bound of context_lens (e.g. a CUDA-graph bucket's) used only to choose the split
                     count; default max_blocks * block_size. Never read from context_lens: that would sync the host.
    tuning:          overrides of the launch choices for bench/tune_decode_attention.py: block_n, num_warps,
                     num_stages, maxnreg, convert (see `to_dot`), biased, pairs, programs_per_sm, num_splits
    returns:         [num_seqs, num_heads, head_dim] in query's dtype
    """
    num_seqs, num_heads, head_dim = query.shape
    num_kv_heads = layer.num_kv_heads
    block_size = layer.block_size
    if num_heads % num_kv_heads != 0:
        raise ValueError(f"num_heads {num_heads} is not a multiple of num_kv_heads {num_kv_heads}")
    if head_dim != layer.head_dim:
        raise ValueError(f"query head_dim {head_dim} != pool head_dim {layer.head_dim}")
    if block_size & (block_size - 1):
        raise ValueError(f"the Triton decode kernel needs a power-of-2 block_size, got {block_size}")
    if block_tables.shape[0] != num_seqs or context_lens.shape != (num_seqs,):
        raise ValueError(
            f"block_tables {tuple(block_tables.shape)} / context_lens {tuple(context_lens.shape)} do not match "
            f"num_seqs={num_seqs}"
        )
    if num_splits is not None and num_splits < 1:
        raise ValueError(f"num_splits must be >= 1, got {num_splits}")
    group = num_heads // num_kv_heads
    rot_dim = 0
    if new is not None:
        check_store_kv_args(new.key, new.value, layer, new.slot_mapping)
        rot_dim = check_rotary_args(new.positions, query, new.key, new.cos_sin_cache)
        if query.stride(-1) != 1:
            query = query.contiguous()
        new = NewToken(new.positions, *(t if t.stride(-1) == 1 else t.contiguous() for t in (new.key, new.value)),
                       new.cos_sin_cache.contiguous(), new.slot_mapping)  # fmt: skip
    out = torch.empty(query.shape, dtype=query.dtype, device=query.device)
    if num_seqs == 0:
        return out

    if max_context_len is None:
        max_context_len = block_tables.shape[1] * block_size
    target = targets.device_target(query.device)
    launch = decode_launch(target, layer.k_format, layer.v_format, head_dim, block_size, num_seqs, num_kv_heads,
                           max_context_len, _num_sms(query.device), num_splits, tuning)  # fmt: skip
    num_splits, block_n = launch["num_splits"], launch["block_n"]
    head_dim_pad = max(16, triton.next_power_of_2(head_dim))
    extra = {k: launch[k] for k in ("num_stages", "maxnreg") if launch.get(k)}
    k_dot_dtype, v_dot_dtype, input_precision = _dot_dtypes(query.dtype, layer)

    if num_splits == 1:
        # Not read: the split kernel writes `out` directly.
        ws_acc = ws_max = ws_sum = out
    else:
        ws_acc = torch.empty(num_seqs, num_heads, num_splits, head_dim, dtype=torch.float32, device=query.device)
        ws_max = torch.empty(num_seqs, num_heads, num_splits, dtype=torch.float32, device=query.device)
        ws_sum = torch.empty_like(ws_max)

    convert = launch["convert"]
    int8_to_fp16 = convert in (1, 2) and input_precision is None
    k_biased = int8_to_fp16 and layer.k_format is KVFormat.INT8 and launch.get("biased", K_BIASED)
    v_pairs = (
        int8_to_fp16
        and layer.v_format is KVFormat.INT8
        and head_dim % 2 == 0
        and layer.v_cache.stride(-1) == 1
        and launch.get("pairs", V_PAIRS)
    )
    v_cache = layer.v_cache.view(torch.int16) if v_pairs else layer.v_cache

    k_scale, v_scale, k_scale_strides, v_scale_strides = scale_args(layer)

    _decode_split_kernel[(num_seqs, num_kv_heads, num_splits)](
        query,
        layer.k_cache,
        v_cache,
        k_scale,
        v_scale,
        block_tables,
        context_lens,
        out,
        ws_acc,
        ws_max,
        ws_sum,
        scale * _LOG2E,
        num_heads,
        num_splits,
        *query.stride(),
        *layer.k_cache.stride(),
        *v_cache.stride(),
        *k_scale_strides,
        *v_scale_strides,
        block_tables.stride(0),
        *out.stride(),
        *_new_token_args(new, query, layer),
        GROUP=group,
        GROUP_PAD=max(16, triton.next_power_of_2(group)),
        HEAD_DIM=head_dim,
        HEAD_DIM_PAD=head_dim_pad,
        BLOCK_SIZE=block_size,
        BLOCK_N=block_n,
        K_SCALED=layer.k_format.has_scale,
        V_SCALED=layer.v_format.has_scale,
        K_DOT_DTYPE=k_dot_dtype,
        V_DOT_DTYPE=v_dot_dtype,
        INPUT_PRECISION=input_precision,
        NUM_SPLITS_IS_ONE=num_splits == 1,
        CONVERT=convert,
        K_BIASED=k_biased,
        V_PAIRS=v_pairs,
        ROTARY=new is not None,
        HALF=rot_dim // 2,
        # the rotated key is rounded to its dtype before it is quantized, as the rotary_store_kv kernel does
        **quantize_constexprs(layer, *((new.key.dtype, new.value.dtype) if new else (query.dtype,) * 2), query.device),
        EARLY_READS=bool(EARLY_READS),
        num_warps=launch["num_warps"],
        **extra,
        **pdl.launch_options(query.device),
    )
    if num_splits > 1:
        _decode_reduce_kernel[(num_seqs, num_heads)](
            out,
            ws_acc,
            ws_max,
            ws_sum,
            num_heads,
            num_splits,
            *out.stride(),
            HEAD_DIM=head_dim,
            HEAD_DIM_PAD=triton.next_power_of_2(head_dim),
            SPLITS_PAD=triton.next_power_of_2(num_splits),
            TRIGGER_FIRST=bool(REDUCE_TRIGGER_FIRST),
            num_warps=4,
            **pdl.launch_options(query.device),
        )
    return out


def _new_token_args(new: NewToken | None, query: torch.Tensor, layer: LayerKV) -> list:
    """The kernel's ROTARY arguments (any tensors and zero strides without `new`: never touched then)."""
    if new is None:
        return [query] * 7 + [0] * 13
    return [
        new.positions,
        new.key,
        new.value,
        new.cos_sin_cache,
        new.slot_mapping,
        layer.k_cache,
        layer.v_cache,
        *new.key.stride()[:2],
        *new.value.stride()[:2],
        new.cos_sin_cache.stride(0),
        *layer.k_cache.stride(),
        *layer.v_cache.stride(),
    ]

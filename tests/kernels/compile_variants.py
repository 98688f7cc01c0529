"""The Triton kernels' variants, as compile checks compile them for one GPU target: the one enumeration that
tests/kernels/compile_sm90.py (Hopper) and tests/kernels/compile_gfx942.py (MI300X) share.

A variant is a kernel, its pointer dtypes, its constexprs and its compile options. What a launch on the target
would choose is chosen here per target, from the same places the launches take it from: PDL where the target has it
(kernels/pdl.py `has_pdl`), the fp8 flavour (kvstore/formats.py `fp8_dtype_for_arch`: e4m3fnuz on gfx942, e4m3fn on
gfx950 and NVIDIA: `tl.float8e4b8` / `tl.float8e4nv` pointers and their quantization constants, max 240 / 448), and
the launch configs from the functions the launches call: decode attention's tile, warps, stages, register cap and
int8 -> fp16 conversion (kernels/triton_decode_attention.py `decode_launch`), the skinny GEMM's tiles, warps and
stages (kernels/triton_skinny_gemm.py `skinny_launch`), prefill attention's tiles, warps and stages
(kernels/triton_prefill_attention.py `_launch_config`), and the warps rules of rotary, rotary_store_kv, store_kv and
silu_and_mul (copied from their launch functions, which compute them inline). What is compiled here is what a launch
on the target runs.

Imported by the compile scripts only, in a process without TRITON_INTERPRET (under it @triton.jit gives interpreter
functions, which do not compile).
"""

from __future__ import annotations

import itertools
from typing import NamedTuple

import torch
import triton
import triton.language as tl
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from kernels import pdl, targets
from kernels import triton_activation as act
from kernels import triton_decode_attention as da
from kernels import triton_gemv as gv
from kernels import triton_norm as nm
from kernels import triton_prefill_attention as pa
from kernels import triton_rotary as rt
from kernels import triton_rotary_store_kv as rsk
from kernels import triton_skinny_gemm as sg
from kernels import triton_store_kv as skv
from kernels.triton_helpers import quantize_constexprs, to_dot
from kvstore.formats import KVFormat, KVSpec, fp8_dtype_for_arch
from kvstore.pool import KVPool, PoolGeometry

FLOATS = {"qk_scale", "eps"}


class Variant(NamedTuple):
    name: str
    fn: object  # a @triton.jit function
    pointers: dict[str, str]  # argument -> Triton pointer type ("*bf16")
    constants: dict[str, object]  # constexpr -> value
    options: dict[str, object]  # triton.compile options (num_warps, num_stages, maxnreg)


def sig(fn, pointers: dict[str, str], constants: dict) -> dict[str, str]:
    """The signature of fn: constexprs, the given pointer types, float32 for FLOATS and int32 for the rest."""
    s = {}
    for name in fn.arg_names:
        if name in constants:
            s[name] = "constexpr"
        elif name in pointers:
            s[name] = pointers[name]
        elif name in FLOATS:
            s[name] = "fp32"
        else:
            s[name] = "i32"
    return s


def source(fn, pointers: dict[str, str], constants: dict, values: dict | None = None,
           aligned: bool = False) -> ASTSource:  # fmt: skip
    """fn's ASTSource. values (integer argument -> value): specialized as a launch with them specializes it (those
    equal to 1 become constants, those divisible by 16 get that hint). aligned (or values): every pointer carries the
    divisible-by-16 hint, as every launch on torch's 256-byte aligned allocations gives it."""
    values = values or {}
    constants = {**constants, **{name: 1 for name, value in values.items() if value == 1}}
    signature = sig(fn, pointers, constants)
    hinted = [name for name in fn.arg_names
              if ((aligned or values) and name in pointers)
              or (signature[name] == "i32" and name in values and values[name] % 16 == 0)]  # fmt: skip
    attrs = {(fn.arg_names.index(name),): [["tt.divisibility", 16]] for name in hinted}
    return ASTSource(fn, signature, constants, attrs)


def is_nvidia(target: GPUTarget) -> bool:
    return targets.is_nvidia(target)


def fp8_types(target: GPUTarget) -> tuple[str, torch.dtype]:
    """(Triton pointer type, torch dtype) of fp8 KV on target, from kvstore/formats.py `fp8_dtype_for_arch` (what
    `fp8_dtype` gives on that GPU): e4m3fnuz on gfx942 (MI300X's native fp8, max 240), OCP e4m3fn (max 448) on NVIDIA
    and on gfx950 (whose hardware converts OCP fp8: Triton 3.6 asserts converting float32 to e4m3fnuz for it)."""
    dtype = fp8_dtype_for_arch(str(target.arch) if targets.is_amd(target) else None)
    return ("*fp8e4b8" if dtype == torch.float8_e4m3fnuz else "*fp8e4nv"), dtype


# The 8B shape's decode (8 KV heads of 128 dims, block size 16) at two launches: batch 64 x 1k context (512 programs of
# 8 tiles: NVIDIA caps the registers of int8/fp8, `capped`) and batch 1 x 8k (a few programs of two tiles or more:
# `FEW_PROGRAMS_UNCAPPED`). SMs/CUs: an H100's 132, an MI300X's 304.
_LAUNCHES = {"capped": (64, 1024), "uncapped": (1, 8192)}


def decode_launch(target: GPUTarget, k_format: KVFormat = KVFormat.INT8, v_format: KVFormat | None = None,
                  launch: str = "capped") -> dict:  # fmt: skip
    """paged_decode_attention's launch config on target (`decode_launch`, the function the launch calls) for the 8B
    shape at `launch` (_LAUNCHES)."""
    num_seqs, context = _LAUNCHES[launch]
    num_sms = 132 if is_nvidia(target) else 304
    return da.decode_launch(target, k_format, v_format or k_format, 128, 16, num_seqs, 8, context, num_sms)


def decode_options(config: dict) -> dict:
    """triton.compile options of a `decode_launch` config."""
    return {k: config[k] for k in ("num_warps", "num_stages", "maxnreg") if k in config}


def convert(target: GPUTarget) -> int:
    """`to_dot`'s CONVERT as paged_decode_attention launches it: 2 (inline PTX) on NVIDIA, 1 (integer ops) elsewhere."""
    return decode_launch(target)["convert"]


def kv_variant(target, fmt, k_type, v_type, dot, biased=False, pairs=False, plain=False):
    """Pointer dtypes and constexprs of one KV format, as paged_decode_attention launches it on target (with the new
    token's store in the same format: quantize_constexprs). plain: CONVERT 1 (the portable int8 conversion) even on
    NVIDIA."""
    scaled = fmt.has_scale
    consts = dict(K_SCALED=scaled, V_SCALED=scaled, K_DOT_DTYPE=dot, V_DOT_DTYPE=dot,
                  CONVERT=1 if plain else convert(target))  # fmt: skip
    # bf16 key and value rows stored on a GPU, into a (tiny) layer of this format
    layer = KVPool.allocate(PoolGeometry(1, 1, 16, 1, 128), KVSpec(fmt, fmt), "cpu").layer(0)
    store = quantize_constexprs(layer, torch.bfloat16, torch.bfloat16, torch.device("cuda"), fp8_types(target)[1])
    pool = k_type  # the store's view of the pool (v_cache_ptr may be its int16 view)
    ptrs = {"k_cache_ptr": k_type, "v_cache_ptr": v_type, "k_pool_ptr": pool, "v_pool_ptr": pool}
    return ptrs, consts | store | dict(K_BIASED=biased, V_PAIRS=pairs)


def kv_formats(target: GPUTarget) -> dict[str, tuple[dict, dict]]:
    fp8 = fp8_types(target)[0]
    return {
        "bf16": kv_variant(target, KVFormat.BF16, "*bf16", "*bf16", tl.bfloat16),
        "int8_pairs": kv_variant(target, KVFormat.INT8, "*i8", "*i16", tl.float16, biased=True, pairs=True),
        "int8_plain": kv_variant(target, KVFormat.INT8, "*i8", "*i8", tl.float16, plain=True),
        "fp8": kv_variant(target, KVFormat.FP8, fp8, fp8, tl.float16),
    }


COMMON_PTRS = {
    "q_ptr": "*bf16",
    "k_scale_ptr": "*fp32",
    "v_scale_ptr": "*fp32",
    "block_tables_ptr": "*i32",
    "context_lens_ptr": "*i32",
    "out_ptr": "*bf16",
    "ws_acc_ptr": "*fp32",
    "ws_max_ptr": "*fp32",
    "ws_sum_ptr": "*fp32",
    "positions_ptr": "*i64",
    "k_new_ptr": "*bf16",
    "v_new_ptr": "*bf16",
    "cos_sin_ptr": "*fp32",
    "slot_mapping_ptr": "*i64",
}
DECODE_BASE = dict(GROUP=4, GROUP_PAD=16, HEAD_DIM=128, HEAD_DIM_PAD=128, BLOCK_SIZE=16, BLOCK_N=128,
                   INPUT_PRECISION=None)  # fmt: skip


@triton.jit
def to_dot_kernel(x_ptr, y_ptr, DOT: tl.constexpr, CONVERT: tl.constexpr, BIASED: tl.constexpr):
    offs = tl.arange(0, 16)
    x = tl.load(x_ptr + offs[:, None] * 16 + offs[None, :])
    tl.store(y_ptr + offs[:, None] * 16 + offs[None, :], to_dot(x, DOT, CONVERT, BIASED))


def variants(target: GPUTarget) -> list[Variant]:
    """Every kernel variant compiled for target: decode attention (4 KV formats x one split or several x the new
    token's rotary and store inside or not), its reduce (2), the batch-1 GEMV (8 prologue/epilogue pairs x preload),
    the fused add + norm (2), the skinny GEMM (2 x 2), then `to_dot` for every tile dtype x CONVERT x bias (CONVERT 2
    is inline PTX: NVIDIA only), then the prefill path's kernels (`prefill_and_store_variants`)."""
    nvidia = is_nvidia(target)
    use_pdl = pdl.has_pdl(target)
    out = []
    # sm_90: every decode variant (bf16 too) as the int8/fp8 launches in most cases, capped at 128 registers with 3
    # stages; AMD: each KV format's launch config
    formats = {"bf16": KVFormat.BF16, "int8_pairs": KVFormat.INT8, "int8_plain": KVFormat.INT8, "fp8": KVFormat.FP8}
    for (name, (ptrs, consts)), one, rotary in itertools.product(kv_formats(target).items(), (True, False),
                                                                 (False, True)):  # fmt: skip
        config = decode_launch(target, KVFormat.INT8 if nvidia else formats[name])
        out.append(Variant(
            f"decode_split {name} one_split={one} rotary={rotary}",
            da._decode_split_kernel,
            COMMON_PTRS | ptrs,
            DECODE_BASE | consts | dict(NUM_SPLITS_IS_ONE=one, ROTARY=rotary, HALF=64, EARLY_READS=rotary, PDL=use_pdl,
                                        BLOCK_N=config["block_n"]),
            decode_options(config),
        ))  # fmt: skip
    for first in (False, True):
        out.append(Variant(
            f"decode_reduce trigger_first={first}",
            da._decode_reduce_kernel,
            {"out_ptr": "*bf16", "ws_acc_ptr": "*fp32", "ws_max_ptr": "*fp32", "ws_sum_ptr": "*fp32"},
            dict(HEAD_DIM=128, HEAD_DIM_PAD=128, SPLITS_PAD=8, TRIGGER_FIRST=first, PDL=use_pdl),
            {"num_warps": 4},
        ))  # fmt: skip
    gemv_ptrs = {
        "x_ptr": "*bf16",
        "w_ptr": "*bf16",
        "b_ptr": "*bf16",
        "y_ptr": "*bf16",
        "res_ptr": "*bf16",
        "nw_ptr": "*bf16",
        "new_res_ptr": "*bf16",
        "sumsq_ptr": "*fp32",
    }
    block_n, block_k, gemv_warps = gv.gemv_config(4096, 4096)  # the 8B shape's o_proj: (8, 1024, 4)
    for (pro, epi), preload in itertools.product(((0, 0), (1, 0), (2, 0), (3, 0), (4, 0), (4, 1), (0, 1), (0, 2)),
                                                (False, True)):  # fmt: skip
        out.append(Variant(
            f"gemv prologue={pro} epilogue={epi} preload={preload} trigger_after_wait={preload}",
            gv._gemv_kernel,
            gemv_ptrs,
            dict(HAS_BIAS=False, PROLOGUE=pro, EPILOGUE=epi, BLOCK_N=block_n, BLOCK_K=block_k, SUMSQ_PAD=512,
                 PRELOAD=preload,
                 TRIGGER_AFTER_WAIT=preload,  # both places of the trigger compile, in half the variants each
                 PDL=use_pdl),
            {"num_warps": gemv_warps},
        ))  # fmt: skip
    for parts in (0, 2):
        out.append(Variant(
            f"rms_norm residual parts={parts}",
            nm._rms_norm_kernel,
            {"x_ptr": "*fp32" if parts else "*bf16", "residual_ptr": "*bf16", "weight_ptr": "*bf16",
             "out_ptr": "*bf16", "new_residual_ptr": "*bf16"},
            dict(BLOCK=4096, HAS_RESIDUAL=True, EARLY_WEIGHT=True, NUM_PARTS=parts, PDL=use_pdl),
            {"num_warps": nm._num_warps(4096)},
        ))  # fmt: skip
    # 64 rows, the 8B shape's o_proj [4096, 4096] (OUT) and a gate_up of 2 x 4096 (SILU_MUL_OUT): 32-column tiles of
    # 128, each as `skinny_launch` configures it on target (sm_90: 4 warps, as many stages as fit, 6; 5 for SILU_MUL_OUT
    # with the preloaded tile)
    for epi, preload in itertools.product((0, 1), (False, True)):
        n = 8192 if epi == sg.SILU_MUL_OUT else 4096
        block_n, block_k, skinny_warps, stages = sg.skinny_launch(n, 4096, 64, 1, epi, preload, target)
        out.append(Variant(
            f"skinny epilogue={epi} preload={preload} trigger_after_wait={preload}",
            sg._skinny_kernel,
            {"x_ptr": "*bf16", "w_ptr": "*bf16", "y_ptr": "*bf16"},
            dict(BLOCK_M=64, BLOCK_N=block_n, BLOCK_K=block_k, EPILOGUE=epi, PRELOAD=preload,
                 TRIGGER_AFTER_WAIT=preload, PDL=use_pdl),
            {"num_stages": stages, "num_warps": skinny_warps},
        ))  # fmt: skip
    pairs = [("*bf16", "bf16"), ("*fp16", "fp16"), ("*i8", "fp16"), (fp8_types(target)[0], "fp16")]
    for (x_type, dot), conv, biased in itertools.product(pairs, (0, 1, 2) if nvidia else (0, 1), (False, True)):
        out.append(Variant(
            f"to_dot {x_type} {dot} convert={conv} biased={biased}",
            to_dot_kernel,
            {"x_ptr": x_type, "y_ptr": "*" + dot},
            {"DOT": {"bf16": tl.bfloat16, "fp16": tl.float16}[dot], "CONVERT": conv, "BIASED": biased},
            {},
        ))  # fmt: skip
    return out + prefill_and_store_variants(target)


# The KV format pairs a pool can have (K and V chosen separately; DESIGN.md "KV pool"), each kernel's per-operand code
# path once: bf16, int8, fp8 for both, and the seed paper's k=int8,v=bf16 (a scaled K with an unscaled V).
KV_PAIRS = {"bf16": (KVFormat.BF16, KVFormat.BF16), "int8": (KVFormat.INT8, KVFormat.INT8),
            "fp8": (KVFormat.FP8, KVFormat.FP8), "k=int8,v=bf16": (KVFormat.INT8, KVFormat.BF16)}  # fmt: skip
# The 8B shape: 32 query heads on 8 KV heads of 128 dims, block size 16; the MLP's d = 14336.
HEADS, KV_HEADS, HEAD_DIM, KV_BLOCK, MLP_D = 32, 8, 128, 16, 14336
# Prefill query lengths whose launch configs differ (`_launch_config`: BLOCK_M shrinks to the query for short chunks,
# NVIDIA's tile grows from 4k tokens)
PREFILL_QUERY_LENS = (1, 32, 64, 2048, 4096)


def _pool_types(target: GPUTarget, fmt: KVFormat) -> str:
    return {KVFormat.BF16: "*bf16", KVFormat.INT8: "*i8", KVFormat.FP8: fp8_types(target)[0]}[fmt]


def _store_constexprs(target: GPUTarget, k_format: KVFormat, v_format: KVFormat) -> dict:
    """`quantize_constexprs` of bf16 key and value rows stored on a GPU into a (tiny) layer of these formats, with the
    target's fp8 flavour."""
    layer = KVPool.allocate(PoolGeometry(1, 1, 16, 1, 128), KVSpec(k_format, v_format), "cpu").layer(0)
    return quantize_constexprs(layer, torch.bfloat16, torch.bfloat16, torch.device("cuda"), fp8_types(target)[1])


def prefill_and_store_variants(target: GPUTarget) -> list[Variant]:
    """The prefill path's kernels on the 8B shape, bf16 activations, as their launch functions configure them:
    paged prefill attention (4 KV format pairs x each distinct `_launch_config` over PREFILL_QUERY_LENS; the cache
    indexed with int32 offsets, plus int8 with int64: OFFSETS_64, a pool layer of 2**31 elements or more), store_kv (4),
    rotary (1), rotary_store_kv (4), silu_and_mul (1)."""
    use_pdl = pdl.has_pdl(target)
    out = []
    for name, (k_format, v_format) in KV_PAIRS.items():
        configs = dict.fromkeys(pa._launch_config(HEAD_DIM, q, torch.bfloat16, v_format.has_scale, target)
                                for q in PREFILL_QUERY_LENS)  # fmt: skip
        wide = [False, True] if name == "int8" else [False]
        for (block_m, block_n, warps, stages), offsets_64 in itertools.product(configs, wide):
            out.append(Variant(
                f"prefill {name} block_m={block_m} block_n={block_n} warps={warps} stages={stages}"
                f" offsets_64={offsets_64}",
                pa._paged_prefill_kernel,
                {"q_ptr": "*bf16", "out_ptr": "*bf16", "k_cache_ptr": _pool_types(target, k_format),
                 "v_cache_ptr": _pool_types(target, v_format), "k_scale_ptr": "*fp32", "v_scale_ptr": "*fp32",
                 "block_tables_ptr": "*i32", "cu_seqlens_ptr": "*i32", "context_lens_ptr": "*i32"},
                dict(GROUP=HEADS // KV_HEADS, BLOCK_SIZE=KV_BLOCK, HEAD_DIM=HEAD_DIM, BLOCK_D=HEAD_DIM, BLOCK_M=block_m,
                     BLOCK_N=block_n, K_SCALED=k_format.has_scale, V_SCALED=v_format.has_scale, IEEE_DOT=False,
                     OFFSETS_64=offsets_64),
                {"num_warps": warps, "num_stages": stages},
            ))  # fmt: skip
    store_ptrs = {"slot_mapping_ptr": "*i64", "k_scale_ptr": "*fp32", "v_scale_ptr": "*fp32"}
    for name, (k_format, v_format) in KV_PAIRS.items():
        caches = {"k_cache_ptr": _pool_types(target, k_format), "v_cache_ptr": _pool_types(target, v_format)}
        store = _store_constexprs(target, k_format, v_format)
        out.append(Variant(
            f"store_kv {name}",
            skv._store_kv_kernel,
            store_ptrs | caches | {"key_ptr": "*bf16", "value_ptr": "*bf16"},
            store | dict(HEADS_PAD=KV_HEADS, DIM_PAD=HEAD_DIM, PDL=use_pdl),
            {},  # Triton's default 4 warps, as store_kv launches it
        ))  # fmt: skip
        out.append(Variant(
            f"rotary_store_kv {name}",
            rsk._rotary_store_kv_kernel,
            store_ptrs | caches | {"positions_ptr": "*i64", "q_ptr": "*bf16", "k_ptr": "*bf16", "v_ptr": "*bf16",
                                   "q_out_ptr": "*bf16", "cache_ptr": "*fp32"},
            store | dict(HALF=HEAD_DIM // 2, HEAD_DIM=HEAD_DIM, DIM_PAD=HEAD_DIM, BLOCK_H=HEADS, BLOCK_KH=KV_HEADS,
                         PDL=use_pdl),
            {"num_warps": max(1, min(8, HEADS * HEAD_DIM // 512))},  # rotary_store_kv's rule
        ))  # fmt: skip
    out.append(Variant(
        "rotary bf16",
        rt._rotary_kernel,
        {"positions_ptr": "*i64", "q_ptr": "*bf16", "k_ptr": "*bf16", "q_out_ptr": "*bf16", "k_out_ptr": "*bf16",
         "cache_ptr": "*fp32"},
        dict(HALF=HEAD_DIM // 2, BLOCK_HALF=HEAD_DIM // 2, HEAD_DIM=HEAD_DIM, BLOCK_TAIL=0, BLOCK_H=HEADS,
             BLOCK_KH=KV_HEADS, PDL=use_pdl),
        {"num_warps": max(1, min(8, HEADS * (HEAD_DIM // 2) // 256))},  # rotary's rule
    ))  # fmt: skip
    out.append(Variant(
        "silu_and_mul bf16",
        act._silu_and_mul_kernel,
        {"x_ptr": "*bf16", "out_ptr": "*bf16"},
        dict(BLOCK=min(act._BLOCK, triton.next_power_of_2(MLP_D)), PDL=use_pdl),
        {"num_warps": 4},
    ))  # fmt: skip
    return out


# The 8B shape at batch 1..64: 32 query heads on 8 KV heads of 128 dims, block size 16, int8 K, V seen as int16 pairs,
# the query and the new token strided views of the qkv projection's [num_seqs, 6144] output.
DECODE_VALUES = dict(
    num_heads=32, num_splits=8, stride_q_s=6144, stride_q_h=128, stride_q_d=1, stride_kc_b=16384, stride_kc_s=1024,
    stride_kc_h=128, stride_kc_d=1, stride_vc_b=8192, stride_vc_s=512, stride_vc_h=64, stride_vc_d=1, stride_ks_b=128,
    stride_ks_s=8, stride_ks_h=1, stride_vs_b=128, stride_vs_s=8, stride_vs_h=1, stride_bt_s=64, stride_o_s=4096,
    stride_o_h=128, stride_o_d=1, stride_kn_s=6144, stride_kn_h=128, stride_vn_s=6144, stride_vn_h=128,
    stride_cache=128, stride_kp_b=16384, stride_kp_s=1024, stride_kp_h=128, stride_kp_d=1, stride_vp_b=16384,
    stride_vp_s=1024, stride_vp_h=128, stride_vp_d=1,
)  # fmt: skip


def decode_as_launched(target: GPUTarget) -> list[tuple[Variant, dict]]:
    """(variant, DECODE_VALUES) of the int8 decode attention kernel as a launch on the 8B shape specializes it: one
    split or several, with the new token's rotary or not, under each launch config the target uses (`decode_launch`;
    NVIDIA: capped and uncapped; ROCm: its one)."""
    ptrs, consts = kv_formats(target)["int8_pairs"]
    choices = {"capped": decode_launch(target, launch="capped"), "uncapped": decode_launch(target, launch="uncapped")}
    if not is_nvidia(target):
        choices = {"rocm": decode_launch(target)}
    out = []
    for one, rotary, (label, config) in itertools.product((True, False), (False, True), choices.items()):
        constants = DECODE_BASE | consts | dict(NUM_SPLITS_IS_ONE=one, ROTARY=rotary, HALF=64, EARLY_READS=rotary,
                                                PDL=pdl.has_pdl(target), BLOCK_N=config["block_n"])  # fmt: skip
        name = f"decode_split int8_pairs one_split={one} rotary={rotary} {label}"
        variant = Variant(name, da._decode_split_kernel, COMMON_PTRS | ptrs, constants, decode_options(config))
        out.append((variant, DECODE_VALUES))
    return out

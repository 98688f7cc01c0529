"""Compiles the Triton kernels' variants for sm_90 (Hopper) and prints, as one line of JSON, {"variants": {variant:
"ok ..." or the error}, "as_launched": {variant: facts}}.

Run by tests/kernels/test_triton_compile.py in a child process without TRITON_INTERPRET (under it @triton.jit gives
interpreter functions, which do not compile). Needs no GPU: Triton ships its own ptxas.

"variants" compile every kernel variant with plain 32-bit integer arguments. "as_launched" compiles the int8 decode
attention kernel as a launch on the 8B shape specializes it (integer arguments equal to 1 become constants, those
divisible by 16 and every pointer carry that hint: what lets Triton vectorize the K/V loads and pipeline them) and
reports what decides its speed: whether the loop's K/V tile loads are asynchronous copies (pipelined) or plain loads,
the shared memory, and ptxas's registers and spills. `python tests/kernels/compile_sm90.py --dump DIR` also writes each
as-launched variant's TTGIR and PTX there, to read.
"""

import glob
import itertools
import json
import os
import re
import subprocess
import sys
import tempfile
import time

import torch
import triton
import triton.language as tl
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from kernels import triton_decode_attention as da
from kernels import triton_gemv as gv
from kernels import triton_norm as nm
from kernels import triton_skinny_gemm as sg
from kernels.triton_helpers import quantize_constexprs, to_dot
from kvstore.formats import KVFormat, KVSpec
from kvstore.pool import KVPool, PoolGeometry

SM90 = GPUTarget("cuda", 90, 32)
FLOATS = {"qk_scale", "eps"}


def sig(fn, pointers, constants):
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


def compile_one(fn, pointers, constants, options=None):
    t = time.time()
    triton.compile(ASTSource(fn, sig(fn, pointers, constants), constants), target=SM90, options=options or {})
    return time.time() - t


results = {}


def attempt(name, *a, **k):
    try:
        results[name] = f"ok {compile_one(*a, **k):.1f}s"
    except Exception as exc:
        results[name] = f"{type(exc).__name__}: {str(exc)[-300:]}"


base = dict(
    GROUP=4, GROUP_PAD=16, HEAD_DIM=128, HEAD_DIM_PAD=128, BLOCK_SIZE=16, BLOCK_N=128, INPUT_PRECISION=None, PDL=True
)


def kv_variant(fmt, k_type, v_type, dot, convert, biased=False, pairs=False):
    """Pointer dtypes and constexprs of one KV format, as paged_decode_attention launches it (with the new token's
    store in the same format: quantize_constexprs)."""
    scaled = fmt.has_scale
    consts = dict(K_SCALED=scaled, V_SCALED=scaled, K_DOT_DTYPE=dot, V_DOT_DTYPE=dot, CONVERT=convert)
    # bf16 key and value rows stored on a GPU, into a (tiny) layer of this format
    layer = KVPool.allocate(PoolGeometry(1, 1, 16, 1, 128), KVSpec(fmt, fmt), "cpu").layer(0)
    store = quantize_constexprs(layer, torch.bfloat16, torch.bfloat16, torch.device("cuda"))
    pool = k_type  # the store's view of the pool (v_cache_ptr may be its int16 view)
    ptrs = {"k_cache_ptr": k_type, "v_cache_ptr": v_type, "k_pool_ptr": pool, "v_pool_ptr": pool}
    return ptrs, consts | store | dict(K_BIASED=biased, V_PAIRS=pairs)


kv = {
    "bf16": kv_variant(KVFormat.BF16, "*bf16", "*bf16", tl.bfloat16, 2),
    "int8_pairs": kv_variant(KVFormat.INT8, "*i8", "*i16", tl.float16, 2, biased=True, pairs=True),
    "int8_plain": kv_variant(KVFormat.INT8, "*i8", "*i8", tl.float16, 1),
    "fp8": kv_variant(KVFormat.FP8, "*fp8e4nv", "*fp8e4nv", tl.float16, 2),
}
common_ptrs = {
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
for (name, (ptrs, consts)), one, rotary in itertools.product(kv.items(), (True, False), (False, True)):
    attempt(
        f"decode_split {name} one_split={one} rotary={rotary}",
        da._decode_split_kernel,
        common_ptrs | ptrs,
        base | consts | dict(NUM_SPLITS_IS_ONE=one, ROTARY=rotary, HALF=64, EARLY_READS=rotary),
        {"num_stages": 3, "maxnreg": 128},
    )
for first in (False, True):
    attempt(
        f"decode_reduce trigger_first={first}",
        da._decode_reduce_kernel,
        {"out_ptr": "*bf16", "ws_acc_ptr": "*fp32", "ws_max_ptr": "*fp32", "ws_sum_ptr": "*fp32"},
        dict(HEAD_DIM=128, HEAD_DIM_PAD=128, SPLITS_PAD=8, TRIGGER_FIRST=first, PDL=True),
    )
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
for (pro, epi), preload in itertools.product(((0, 0), (1, 0), (2, 0), (3, 0), (4, 0), (4, 1), (0, 1), (0, 2)),
                                            (False, True)):  # fmt: skip
    attempt(
        f"gemv prologue={pro} epilogue={epi} preload={preload} trigger_after_wait={preload}",
        gv._gemv_kernel,
        gemv_ptrs,
        dict(
            HAS_BIAS=False,
            PROLOGUE=pro,
            EPILOGUE=epi,
            BLOCK_N=8,
            BLOCK_K=1024,
            SUMSQ_PAD=512,
            PRELOAD=preload,
            TRIGGER_AFTER_WAIT=preload,  # both places of the trigger compile, in half the variants each
            PDL=True,
        ),
    )
for parts in (0, 2):
    attempt(
        f"rms_norm residual parts={parts}",
        nm._rms_norm_kernel,
        {
            "x_ptr": "*fp32" if parts else "*bf16",
            "residual_ptr": "*bf16",
            "weight_ptr": "*bf16",
            "out_ptr": "*bf16",
            "new_residual_ptr": "*bf16",
        },
        dict(BLOCK=4096, HAS_RESIDUAL=True, EARLY_WEIGHT=True, NUM_PARTS=parts, PDL=True),
    )
for epi, preload in itertools.product((0, 1), (False, True)):
    attempt(
        f"skinny epilogue={epi} preload={preload} trigger_after_wait={preload}",
        sg._skinny_kernel,
        {"x_ptr": "*bf16", "w_ptr": "*bf16", "y_ptr": "*bf16"},
        dict(BLOCK_M=64, BLOCK_N=32, BLOCK_K=128, EPILOGUE=epi, PRELOAD=preload, TRIGGER_AFTER_WAIT=preload, PDL=True),
        {"num_stages": 6},
    )


@triton.jit
def to_dot_kernel(x_ptr, y_ptr, DOT: tl.constexpr, CONVERT: tl.constexpr, BIASED: tl.constexpr):
    offs = tl.arange(0, 16)
    x = tl.load(x_ptr + offs[:, None] * 16 + offs[None, :])
    tl.store(y_ptr + offs[:, None] * 16 + offs[None, :], to_dot(x, DOT, CONVERT, BIASED))


pairs = [("*bf16", "bf16"), ("*fp16", "fp16"), ("*i8", "fp16"), ("*fp8e4nv", "fp16")]
for (x_type, dot), convert, biased in itertools.product(pairs, (0, 1, 2), (False, True)):
    dot_dtype = {"bf16": tl.bfloat16, "fp16": tl.float16}[dot]
    attempt(
        f"to_dot {x_type} {dot} convert={convert} biased={biased}",
        to_dot_kernel,
        {"x_ptr": x_type, "y_ptr": "*" + dot},
        {"DOT": dot_dtype, "CONVERT": convert, "BIASED": biased},
    )


def as_launched(fn, pointers, values, constants, options):
    """Compile fn as a launch with these integer argument values specializes it; the compiled kernel."""
    constants = {**constants, **{name: 1 for name, value in values.items() if value == 1}}
    signature = sig(fn, pointers, constants)
    # torch's allocations are 256-byte aligned; an integer divisible by 16 gets the same hint
    attrs = {(i,): [["tt.divisibility", 16]] for i, name in enumerate(fn.arg_names)
             if name in pointers or (signature[name] == "i32" and values[name] % 16 == 0)}  # fmt: skip
    return triton.compile(ASTSource(fn, signature, constants, attrs), target=SM90, options=options)


def ptxas_report(ptx: str, maxnreg: int) -> tuple[int, int]:
    """(registers, spill store bytes) of ptxas -v on the PTX, with Triton's bundled ptxas."""
    ptxas = glob.glob(os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas"))[0]
    with tempfile.TemporaryDirectory() as tmp:
        source = os.path.join(tmp, "kernel.ptx")
        with open(source, "w") as f:
            f.write(ptx)
        command = [ptxas, "-v", "-arch=sm_90a", f"--maxrregcount={maxnreg}", source, "-o", f"{tmp}/kernel.cubin"]
        proc = subprocess.run(command, capture_output=True, text=True, check=True)
    registers = int(re.search(r"Used (\d+) registers", proc.stderr).group(1))
    spills = int(re.search(r"(\d+) bytes spill stores", proc.stderr).group(1))
    return registers, spills


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
launched = {}
dump = sys.argv[sys.argv.index("--dump") + 1] if "--dump" in sys.argv else None
ptrs, consts = kv["int8_pairs"]
capped = {"num_stages": da.QUANTIZED_NUM_STAGES, "maxnreg": da.QUANTIZED_NVIDIA_TUNING["maxnreg"], "num_warps": 4}
uncapped = {"num_stages": 5, "num_warps": 4}  # FEW_PROGRAMS_UNCAPPED's launches of two tiles or more
for one, rotary, options in itertools.product((True, False), (False, True), (capped, uncapped)):
    name = f"decode_split int8_pairs one_split={one} rotary={rotary} " + ("capped" if options is capped else "uncapped")
    try:
        kernel = as_launched(da._decode_split_kernel, common_ptrs | ptrs, DECODE_VALUES,
                             base | consts | dict(NUM_SPLITS_IS_ONE=one, ROTARY=rotary, HALF=64, EARLY_READS=rotary),
                             options)  # fmt: skip
    except Exception as exc:
        launched[name] = {"error": f"{type(exc).__name__}: {str(exc)[-300:]}"}
        continue
    ttgir, ptx = kernel.asm["ttgir"], kernel.asm["ptx"]
    registers, spills = ptxas_report(ptx, options.get("maxnreg", 255))
    launched[name] = {
        # the K tile [128 tokens, 128 dims] int8 and the V tile [128, 64] int16 pairs, in the loop
        "kv_async_copies": len(
            re.findall(r"async_copy_global_to_local .*tensor<128x(128x!tt\.ptr<i8>|64x!tt\.ptr<i16>)", ttgir)
        ),
        "kv_plain_loads": len(re.findall(r"tt\.load .*tensor<128x(128x!tt\.ptr<i8>|64x!tt\.ptr<i16>)", ttgir)),
        "shared_bytes": kernel.metadata.shared,
        "registers": registers,
        "spill_bytes": spills,
    }
    if dump:
        os.makedirs(dump, exist_ok=True)
        stem = os.path.join(dump, name.replace(" ", "_").replace("=", ""))
        for ext, text in (("ttgir", ttgir), ("ptx", ptx)):
            with open(f"{stem}.{ext}", "w") as f:
                f.write(text)
print(json.dumps({"variants": results, "as_launched": launched}))

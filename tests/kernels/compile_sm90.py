"""Compiles the Triton kernels' variants for sm_90 (Hopper) and prints, as one line of JSON, {"variants": {variant:
"ok ..." or the error}, "as_launched": {variant: facts}}.

Run by tests/kernels/test_triton_compile.py in a child process without TRITON_INTERPRET (under it @triton.jit gives
interpreter functions, which do not compile). Needs no GPU: Triton ships its own ptxas.

"variants" compile every kernel variant (tests/kernels/compile_variants.py, shared with compile_gfx942.py) with plain
32-bit integer arguments. "as_launched" compiles the int8 decode
attention kernel as a launch on the 8B shape specializes it (integer arguments equal to 1 become constants, those
divisible by 16 and every pointer carry that hint: what lets Triton vectorize the K/V loads and pipeline them) and
reports what decides its speed: whether the loop's K/V tile loads are asynchronous copies (pipelined) or plain loads,
the shared memory, and ptxas's registers and spills. `python tests/kernels/compile_sm90.py --dump DIR` also writes each
as-launched variant's TTGIR and PTX there, to read.
"""

import glob
import json
import os
import re
import subprocess
import sys
import tempfile
import time

import triton
from triton.backends.compiler import GPUTarget

from tests.kernels.compile_variants import decode_as_launched, source, variants

SM90 = GPUTarget("cuda", 90, 32)


def attempt(variant) -> str:
    t = time.time()
    try:
        triton.compile(source(variant.fn, variant.pointers, variant.constants), target=SM90, options=variant.options)
    except Exception as exc:
        return f"{type(exc).__name__}: {str(exc)[-300:]}"
    return f"ok {time.time() - t:.1f}s"


results = {v.name: attempt(v) for v in variants(SM90)}


def ptxas_report(ptx: str, maxnreg: int) -> tuple[int, int]:
    """(registers, spill store bytes) of ptxas -v on the PTX, with Triton's bundled ptxas."""
    ptxas = glob.glob(os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas"))[0]
    with tempfile.TemporaryDirectory() as tmp:
        ptx_file = os.path.join(tmp, "kernel.ptx")
        with open(ptx_file, "w") as f:
            f.write(ptx)
        command = [ptxas, "-v", "-arch=sm_90a", f"--maxrregcount={maxnreg}", ptx_file, "-o", f"{tmp}/kernel.cubin"]
        proc = subprocess.run(command, capture_output=True, text=True, check=True)
    registers = int(re.search(r"Used (\d+) registers", proc.stderr).group(1))
    spills = int(re.search(r"(\d+) bytes spill stores", proc.stderr).group(1))
    return registers, spills


launched = {}
dump = sys.argv[sys.argv.index("--dump") + 1] if "--dump" in sys.argv else None
for variant, values in decode_as_launched(SM90):
    name, options = variant.name, variant.options
    try:
        kernel = triton.compile(source(variant.fn, variant.pointers, variant.constants, values), target=SM90,
                                options=options)  # fmt: skip
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

"""The Triton kernels compiled for a Hopper GPU (sm_90) on this machine, GPU or not.

The CPU suite runs the kernels under TRITON_INTERPRET=1, which executes their Python directly: code that the GPU
compiler rejects can pass there. (It happened: an early `return` under a compile-time `if` in `_to_dot` ran fine in
the interpreter, while Triton's frontend went on to generate the int8 byte tricks after it for bf16 tiles, and bf16
decode attention failed to compile on the GPU.) Triton ships its own ptxas, so compiling to SASS needs no GPU; the
compile runs in a child process without TRITON_INTERPRET (under it, @triton.jit gives interpreter functions).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("triton", reason="triton is not installed: nothing to compile")

ROOT = Path(__file__).resolve().parent.parent

# Every (tile dtype, dot dtype) the decode attention feeds `_to_dot`, with each conversion and bias choice.
SCRIPT = r"""
import itertools, json, sys
import triton
import triton.language as tl
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from kernels.triton_decode_attention import _to_dot

@triton.jit
def to_dot_kernel(x_ptr, y_ptr, DOT: tl.constexpr, CONVERT: tl.constexpr, BIASED: tl.constexpr):
    offs = tl.arange(0, 16)
    x = tl.load(x_ptr + offs[:, None] * 16 + offs[None, :])
    tl.store(y_ptr + offs[:, None] * 16 + offs[None, :], _to_dot(x, DOT, CONVERT, BIASED))

results = {}
pairs = [("*bf16", "bf16"), ("*fp16", "fp16"), ("*i8", "fp16"), ("*fp8e4nv", "fp16")]
for (x_type, dot), convert, biased in itertools.product(pairs, (0, 1, 2), (False, True)):
    signature = {"x_ptr": x_type, "y_ptr": "*" + dot, "DOT": "constexpr", "CONVERT": "constexpr",
                 "BIASED": "constexpr"}
    constants = {"DOT": {"bf16": tl.bfloat16, "fp16": tl.float16}[dot], "CONVERT": convert, "BIASED": biased}
    try:
        kernel = triton.compile(ASTSource(to_dot_kernel, signature, constants), target=GPUTarget("cuda", 90, 32))
        results[f"{x_type} {dot} {convert} {biased}"] = "ok" if kernel.asm.get("cubin") else "no cubin"
    except Exception as exc:
        results[f"{x_type} {dot} {convert} {biased}"] = f"{type(exc).__name__}: {str(exc)[-300:]}"
print(json.dumps(results))
"""


def test_decode_attention_conversions_compile_for_sm90(tmp_path: Path) -> None:
    script = tmp_path / "compile_to_dot.py"  # a file: @triton.jit reads its function's source
    script.write_text(SCRIPT)
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = f"{ROOT}{os.pathsep}{env.get('PYTHONPATH', '')}"
    proc = subprocess.run([sys.executable, str(script)], env=env, cwd=ROOT, capture_output=True, text=True,
                          timeout=600)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    results = json.loads(proc.stdout.strip().splitlines()[-1])
    assert len(results) == 24
    failed = {k: v for k, v in results.items() if v != "ok"}
    assert not failed, failed

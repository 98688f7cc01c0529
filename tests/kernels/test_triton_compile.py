"""The Triton kernels compiled for a Hopper GPU (sm_90) on this machine, GPU or not.

The CPU suite runs the kernels under TRITON_INTERPRET=1, which executes their Python directly: code that the GPU
compiler rejects can pass there. (It happened: an early `return` under a compile-time `if` in `to_dot` ran fine in
the interpreter, while Triton's frontend went on to generate the int8 byte tricks after it for bf16 tiles, and bf16
decode attention failed to compile on the GPU.) Triton ships its own ptxas, so compiling to SASS needs no GPU;
tests/kernels/compile_sm90.py compiles in a child process without TRITON_INTERPRET.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("triton", reason="triton is not installed: nothing to compile")

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def report() -> dict:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = f"{ROOT}{os.pathsep}{env.get('PYTHONPATH', '')}"
    script = ROOT / "tests" / "kernels" / "compile_sm90.py"
    proc = subprocess.run([sys.executable, str(script)], env=env, cwd=ROOT, capture_output=True, text=True,
                          timeout=900)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def compiled(report: dict) -> dict[str, str]:
    return report["variants"]


def test_decode_attention_conversions_compile_for_sm90(compiled: dict[str, str]) -> None:
    """`to_dot` (kernels/triton_helpers.py) for every tile dtype decode attention feeds it (bf16, fp16, int8, e4m3),
    conversion and bias."""
    variants = {k: v for k, v in compiled.items() if k.startswith("to_dot")}
    assert len(variants) == 24
    assert all(v.startswith("ok") for v in variants.values()), variants


def test_kernel_variants_compile_for_sm90(compiled: dict[str, str]) -> None:
    """Decode attention (bf16, int8 with and without the pairs/bias tricks, fp8; one split and several; with the new
    token's rotary and store in the kernel), its reduce kernel (letting the next kernel launch before or after its
    wait), the batch-1 GEMV's prologues and epilogues with and without the weight chunk read before the PDL wait (the
    next kernel let launch after the wait with it, after the loop without), the skinny GEMM's two epilogues with and
    without its preloaded tile (the trigger likewise; one launch of it takes split-K shares), the fused
    add + norm of a row and of float32 partial sums: 16 + 2 + 8 x 2 + 2 x 2 + 2; then the prefill path as its launches
    configure it on sm_90: prefill attention (4 KV format pairs x each distinct launch config, int8 also with int64
    offsets: 17), store_kv and rotary_store_kv (4 formats each), rotary, silu_and_mul: 40 + 27."""
    variants = {k: v for k, v in compiled.items() if not k.startswith("to_dot")}
    assert len(variants) == 67
    failed = {k: v for k, v in variants.items() if not v.startswith("ok")}
    assert not failed, failed


def test_int8_decode_attention_as_launched_is_pipelined(report: dict) -> None:
    """The int8 decode attention kernel (capped at 128 registers with 3 stages, and uncapped with 5: both are
    launched, kernels/triton_decode_attention.py FEW_PROGRAMS_UNCAPPED), specialized as a launch on the 8B shape
    specializes it: its loop reads the
    K and V tiles with asynchronous copies (Triton's pipeliner; plain loads in the loop measured 0.62-0.72 of copy
    bandwidth against 0.79, H200) and ptxas spills little under the 128-register cap (20-36 bytes now; a variant
    with 80-144 bytes was slower). Compiled without those specializations the same kernel loads K byte by byte:
    the other variants here check only that the code compiles."""
    launched = report["as_launched"]
    assert len(launched) == 8, launched
    for name, facts in launched.items():
        assert "error" not in facts, (name, facts)
        assert facts["kv_async_copies"] >= 2 and facts["kv_plain_loads"] == 0, (name, facts)
        assert facts["spill_bytes"] <= 64, (name, facts)

"""Shared fixtures: the default model converted once per session, HF references, tiny random checkpoints."""

from __future__ import annotations

import glob
import os
import shutil
import tempfile
import uuid
from pathlib import Path

import pytest
import torch

if not torch.cuda.is_available():
    # Triton kernels run under the interpreter on the CPU; it must be set before triton is imported.
    os.environ.setdefault("TRITON_INTERPRET", "1")


def _fix_triton_interpreter() -> None:
    """Triton 3.6's interpreter holds scalars as 1-element arrays and turns them into Python ints with int(array),
    which numpy >= 2.4 refuses (triton-lang/triton#9171, fixed upstream): any `range(runtime_scalar)` loop fails.
    Index the element instead. Interpreter only; compiled kernels are untouched."""
    try:
        from triton.runtime import interpreter
    except ImportError:
        return
    original = interpreter._patch_lang_tensor
    if getattr(original, "kvrelay_fixed", False):
        return

    def patched(tensor, scope) -> None:
        original(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.reshape(-1)[0]))

    patched.kvrelay_fixed = True
    interpreter._patch_lang_tensor = patched

    # Its dtype.to_ir knows every fp8 type but fp8e4b8 (e4m3fnuz, MI300X's fp8: "fail to convert fp8e4b8 to ir type"
    # at any cast to it, `other=0.0` of a load included), though its builder has get_fp8e4b8_ty and its casts support
    # it (supported_fp8_dtypes). Add that one branch.
    original_core = interpreter._patch_lang_core

    def patched_core(lang, scope) -> None:
        original_core(lang, scope)
        to_ir = lang.dtype.to_ir

        def new_to_ir(self, builder):
            return builder.get_fp8e4b8_ty() if self.name == "fp8e4b8" else to_ir(self, builder)

        scope.set_attr(lang.dtype, "to_ir", new_to_ir)

    interpreter._patch_lang_core = patched_core


if os.environ.get("TRITON_INTERPRET") == "1":
    _fix_triton_interpreter()

DATA = Path(__file__).parent / "data"

# What tests create and must remove: deployments' Redis keys, /dev/shm regions and logs, the launcher's private
# folders. Every one of them carries this run's mark in its name (kvrelay/deployment.py names deployments
# kvtest<run><id>; the Redis tests use the prefix kvtest<run>-<id>); anything of this run still there at the end fails
# the run. The mark keeps another test run or a live deployment on the same machine out of the check.
RUN = os.environ.setdefault("KVRELAY_TEST_RUN", uuid.uuid4().hex[:6])
LEFTOVER_FILES = (f"/tmp/*kvtest{RUN}*", f"/dev/shm/*kvtest{RUN}*")
LEFTOVER_KEYS = (f"kvtest{RUN}*",)


def _leftovers() -> set[str]:
    found = {path for pattern in LEFTOVER_FILES for path in glob.glob(pattern)}
    try:
        import redis

        client = redis.Redis.from_url(os.environ.get("REDIS_URL", "redis://127.0.0.1:6379/0"), socket_timeout=2)
        for pattern in LEFTOVER_KEYS:
            found |= {f"redis:{key.decode()}" for key in client.scan_iter(match=pattern, count=1000)}
        client.close()
    except Exception:  # no Redis here: the Redis tests skip themselves, and there is nothing to leave behind
        pass
    return found


# pytest's own temporary folders: one per run, removed at its end. Under the shared /tmp/pytest-of-<user> a second
# pytest run on the same machine deletes the first's folders while it still uses them (its cleanup of old runs).
BASETEMP = Path(tempfile.gettempdir()) / f"kvrelay-pytest-{RUN}"


@pytest.hookimpl(tryfirst=True)
def pytest_configure(config):
    if config.option.basetemp is None:
        config.option.basetemp = str(BASETEMP)


def pytest_sessionfinish(session, exitstatus):
    shutil.rmtree(BASETEMP, ignore_errors=True)


@pytest.fixture(scope="session", autouse=True)
def nothing_left_behind():
    yield
    left = sorted(_leftovers())
    if left:
        pytest.fail(f"the tests left {len(left)} things behind: {', '.join(left[:20])}", pytrace=False)


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA/ROCm GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def default_model_dir() -> Path:
    from kvrelay.model_config import ModelConfigError
    from services.model.default_model import resolve_model

    try:
        return resolve_model(None, progress=False)
    except (ModelConfigError, ImportError) as exc:
        # the GPU machine has no package registry (the default model's package, or gguf to convert it, may be
        # missing): say so, do not fail
        if torch.cuda.is_available():
            pytest.skip(f"default model not installed here: {exc}")
        raise


@pytest.fixture(scope="session")
def default_gguf_path() -> Path:
    from services.model.default_model import default_gguf_path

    return default_gguf_path()


@pytest.fixture(scope="session")
def hf_reference_model(default_gguf_path, tmp_path_factory):
    """transformers' own GGUF loader (its dequantization and Q/K un-permutation, not ours), float32."""
    transformers = pytest.importorskip("transformers")
    folder = tmp_path_factory.mktemp("hf_gguf")
    (folder / default_gguf_path.name).symlink_to(default_gguf_path)
    model = transformers.AutoModelForCausalLM.from_pretrained(
        str(folder), gguf_file=default_gguf_path.name, dtype=torch.float32
    )
    return model.eval()


@pytest.fixture(scope="session")
def english_text() -> str:
    return (DATA / "english.txt").read_text()


def save_tiny_checkpoint(hf_config, out: Path, seed: int = 0) -> Path:
    """A random-weight HF checkpoint (safetensors) of a given transformers config, for variants we cannot download."""
    import transformers

    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(hf_config, dtype=torch.float32)
    # Random weights everywhere (norms too), so a wrong transpose or a missing bias cannot hide behind ones/zeros.
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.normal_(1.0 if "norm" in name else 0.0, 0.2 if p.dim() == 1 else 0.08)
    if out.exists():
        shutil.rmtree(out)
    model.save_pretrained(out, safe_serialization=True)
    return out

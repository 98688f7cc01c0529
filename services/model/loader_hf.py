"""Read an HF safetensors checkpoint directory (single file or sharded with model.safetensors.index.json)."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import torch
from safetensors import safe_open
from tqdm import tqdm

from kvrelay.model_config import ModelConfigError


def safetensors_files(model_dir: str | Path) -> list[Path]:
    model_dir = Path(model_dir)
    index = model_dir / "model.safetensors.index.json"
    if index.is_file():
        shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        files = [model_dir / s for s in shards]
    else:
        files = sorted(model_dir.glob("*.safetensors"))
    missing = [str(f) for f in files if not f.is_file()]
    if missing or not files:
        raise ModelConfigError(f"no safetensors weights in {model_dir}" + (f" (missing {missing})" if missing else ""))
    return files


def iter_safetensors(model_dir: str | Path, progress: bool = True) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield (name, tensor) for every tensor of the checkpoint; a progress bar counts bytes for large checkpoints."""
    files = safetensors_files(model_dir)
    total = sum(f.stat().st_size for f in files)
    # A bar is noise for small checkpoints (the default model loads in about a second).
    with tqdm(
        total=total, unit="B", unit_scale=True, desc="loading weights", disable=not progress or total < 2**30
    ) as bar:
        for file in files:
            with safe_open(str(file), framework="pt") as f:
                for name in f.keys():
                    tensor = f.get_tensor(name)
                    bar.update(tensor.numel() * tensor.element_size())
                    yield name, tensor

"""Where a deployment's /dev/shm files live (the CPU path's shared regions). Torch-free: the launcher removes what a
killed kvstore left behind without importing the memory code (kvstore/sharing.py)."""

from __future__ import annotations

import os
from pathlib import Path

SHM_DIR = Path(os.environ.get("KVRELAY_SHM_DIR", "/dev/shm"))


def shm_path(name: str) -> Path:
    return SHM_DIR / name

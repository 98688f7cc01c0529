"""The environment CUDA/HIP IPC of the weights and the KV pool needs (kvstore/sharing.py), in every process that
exports or maps them. Torch-free: the launcher gives it to each process it starts.

- Expandable segments off: with them PyTorch maps memory in virtual segments that grow, and an IPC handle of one
  allocation no longer covers the whole region (torch refuses, or the mapping is wrong). PyTorch reads the setting
  from PYTORCH_CUDA_ALLOC_CONF on both vendors (ROCm falls back to PYTORCH_HIP_ALLOC_CONF when that is unset) and,
  in recent releases, PYTORCH_ALLOC_CONF first: each one present gets `expandable_segments:False` (its other options
  kept); with none present PYTORCH_CUDA_ALLOC_CONF is set to it, so a future default cannot turn them on.
- HSA_ENABLE_IPC_MODE_LEGACY unset: ROCr's legacy IPC mode is reported to make hipIpcGetMemHandle fail ("invalid
  argument") where the default mode works; an inherited value (some ROCm images set it to 1) is removed, so every
  process uses ROCr's default mode and all agree on it. Neither has been run on an AMD GPU (none was lent).
"""

from __future__ import annotations

from collections.abc import Mapping

ALLOC_CONF_VARS = ("PYTORCH_ALLOC_CONF", "PYTORCH_CUDA_ALLOC_CONF", "PYTORCH_HIP_ALLOC_CONF")
LEGACY_IPC_VAR = "HSA_ENABLE_IPC_MODE_LEGACY"
OFF = "expandable_segments:False"


def _options(conf: str) -> list[str]:
    return [o.strip() for o in conf.split(",") if o.strip()]


def ipc_env(env: Mapping[str, str]) -> dict[str, str]:
    """`env` as a process that shares GPU memory by IPC must see it (the rules above)."""
    out = {k: v for k, v in env.items() if k != LEGACY_IPC_VAR}
    present = [name for name in ALLOC_CONF_VARS if name in out]
    for name in present or ["PYTORCH_CUDA_ALLOC_CONF"]:
        kept = [o for o in _options(out.get(name, "")) if not o.replace(" ", "").startswith("expandable_segments:")]
        out[name] = ",".join([*kept, OFF])
    return out


def expandable_segments_on(env: Mapping[str, str]) -> str | None:
    """The variable that turns expandable segments on in `env`, if any (the kvstore refuses to export then)."""
    for name in ALLOC_CONF_VARS:
        if any(o.replace(" ", "").lower() == "expandable_segments:true" for o in _options(env.get(name, ""))):
            return name
    return None

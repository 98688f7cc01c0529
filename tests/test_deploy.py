"""The image's Dockerfile, checked without a Docker engine (none here): its bases are pinned tags, what it copies
exists, and the environment it sets is the one IPC needs. It does not build the image."""

from __future__ import annotations

import re
from pathlib import Path

import yaml

from kvstore.ipc_env import expandable_segments_on

ROOT = Path(__file__).resolve().parents[1]


def instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) of deploy/Dockerfile, continuation lines joined, comments dropped."""
    text = re.sub(r"\\\n", " ", (ROOT / "deploy" / "Dockerfile").read_text())
    lines = [line.strip() for line in text.splitlines() if line.strip() and not line.lstrip().startswith("#")]
    return [(line.split(None, 1)[0].upper(), line.split(None, 1)[1]) for line in lines]


def pinned(image: str) -> bool:
    name, _, tag = image.partition(":")
    return "@sha256:" in image or (bool(name) and bool(re.search(r"\d", tag)) and "latest" not in tag)


def test_dockerfile_bases_are_pinned_and_its_copies_exist():
    steps = instructions()
    args = dict(a.split("=", 1) for op, a in steps if op == "ARG" and "=" in a)
    assert pinned(args["BASE"]), args["BASE"]  # the ROCm default
    assert re.match(r"rocm/pytorch:rocm6\.\d", args["BASE"])  # ROCm 6.x
    cuda = yaml.safe_load((ROOT / "deploy" / "docker-compose.cuda.yml").read_text())
    assert pinned(cuda["services"]["kvstore"]["build"]["args"]["BASE"])  # the NVIDIA override
    assert [a for op, a in steps if op == "FROM"] == ["${BASE}"]
    for op, a in steps:
        if op == "COPY":
            *sources, _ = a.split()
            assert all((ROOT / s).exists() for s in sources), a


def test_dockerfile_environment_keeps_ipc_working():
    env = dict(
        (k, v.strip('"')) for op, a in instructions() if op == "ENV" for k, v in re.findall(r'(\w+)=("[^"]*"|\S+)', a)
    )
    assert "HSA_ENABLE_IPC_MODE_LEGACY" not in env
    assert env["PYTORCH_CUDA_ALLOC_CONF"] == "expandable_segments:False" and expandable_segments_on(env) is None

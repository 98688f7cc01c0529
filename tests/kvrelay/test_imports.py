"""The package map: import directions (kvrelay.devtools.imports) and the torch-free gateway, CLI and client."""

from __future__ import annotations

import subprocess
import sys

import pytest

from kvrelay.devtools import imports
from kvrelay.devtools.imports import Import, rule_for


def test_the_source_follows_the_package_map():
    found = imports.violations()
    assert not found, "\n".join(str(v) for v in found)


@pytest.mark.parametrize(
    "path, module, lazy",
    [
        ("gateway/server.py", "services.model.engine.Engine", False),
        ("gateway/server.py", "torch", False),
        ("gateway/router.py", "kernels.ops", True),
        ("kvrelay/client.py", "services.model.config", True),  # lazily is allowed in cli.py only
        ("kvrelay/launcher.py", "torch", True),
        ("kernels/ops.py", "kvstore.sessions.SessionStore", False),
        ("kernels/ops.py", "services.model.runner", False),
        ("kvstore/pool.py", "services.model.config", False),
        ("services/prefill/server.py", "gateway.router.Router", False),
        ("services/prefill/server.py", "kvrelay.cli.main", False),
        ("services/prefill/server.py", "tests.conftest", False),
        ("gateway/server.py", "bench.common", False),
    ],
)
def test_the_checker_refuses_what_the_map_forbids(path, module, lazy):
    assert rule_for(Import(path, 1, module, lazy)) is not None


@pytest.mark.parametrize(
    "path, module, lazy",
    [
        ("kvrelay/cli.py", "services.offline.run_command", True),
        ("gateway/server.py", "kvrelay.rpc.lifecycle.serve", False),
        ("services/decode/server.py", "kvrelay.settings.DecodeSettings", False),
        ("kernels/store_kv.py", "kvstore.formats.LayerKV", False),
        ("bench/serve_modes.py", "kvrelay.deployment.Deployment", False),
        ("tests/kvrelay/test_loadgen.py", "kvrelay.loadgen.run", False),
    ],
)
def test_the_checker_allows_what_the_map_allows(path, module, lazy):
    assert rule_for(Import(path, 1, module, lazy)) is None


def test_the_command_line_check_passes():
    out = subprocess.run([sys.executable, "-m", "kvrelay.devtools.imports"], capture_output=True, text=True)
    assert out.returncode == 0, out.stdout + out.stderr


# Every module of the two torch-free packages, imported in a fresh interpreter: none may pull in torch (a gateway
# container without the GPU stack, a CLI that answers in a tenth of a second).
TORCH_FREE = """
import importlib, pkgutil, sys
import gateway, kvrelay
names = []
for package in (gateway, kvrelay):
    for info in pkgutil.walk_packages(package.__path__, package.__name__ + "."):
        importlib.import_module(info.name)
        names.append(info.name)
heavy = sorted(m for m in ("torch", "triton", "services", "kernels") if m in sys.modules)
print(len(names), " ".join(heavy))
"""


def test_gateway_and_kvrelay_never_import_torch():
    out = subprocess.run([sys.executable, "-c", TORCH_FREE], capture_output=True, text=True, check=True)
    count, _, heavy = out.stdout.strip().partition(" ")
    assert int(count) > 20  # the walk found the modules (gateway server, router, CLI, client, loadgen, ...)
    assert heavy == "", f"imported: {heavy}"

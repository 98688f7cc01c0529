"""The allowed import directions between kvrelay's packages, checked from the source (no module is imported).

    python -m kvrelay.devtools.imports        # prints each violation; exit status 1 if there is any

The map (ARCHITECTURE.md shows it too):

    kvrelay.cli (and the launcher it starts) -> gateway, services     as processes, never as imports
    gateway   -> kvrelay (its torch-free runtime: v1, rpc, settings, sampling, model_config, tokenizer, trace,
                 errors, ids), kvstore
    services  -> kvrelay (same), kernels, kvstore
    kernels   -> kvstore.formats only
    kvstore   -> kvstore, kvrelay's runtime
    bench     -> any package, never tests
    nothing   -> tests, bench (except tests -> bench for the benchmarks' own unit tests)

Inside `kvrelay`, the user-facing modules (cli, launcher, client, loadgen, deployment) may be imported only by
kvrelay itself, bench and tests: the processes must not depend on the CLI. `kvrelay/cli.py` alone may import
`services` lazily, inside the functions of the subcommands that run a model in-process (`run`, `make-checkpoint`, and
resolving a GGUF before `up`): that is what keeps `kvrelay generate` free of torch.

Third-party rules: gateway and kvrelay never import torch or triton (at module level or lazily, except cli's
lazy model subcommands, which reach torch only through services).
"""

from __future__ import annotations

import ast
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = ("kvrelay", "gateway", "services", "kernels", "kvstore", "bench", "tests")
# kvrelay's modules that the processes may import: the generated protos and the torch-free runtime they share.
KVRELAY_RUNTIME = (
    "kvrelay.v1",
    "kvrelay.internal",
    "kvrelay.rpc",
    "kvrelay.settings",
    "kvrelay.sampling",
    "kvrelay.model_config",
    "kvrelay.tokenizer",
    "kvrelay.trace",
    "kvrelay.errors",
    "kvrelay.ids",
)
# The one file allowed lazy imports of services (function-level only).
LAZY_SERVICES_OK = "kvrelay/cli.py"


@dataclass(frozen=True)
class Import:
    path: str  # file, relative to the repository root
    line: int
    module: str  # the imported module, dotted
    lazy: bool  # inside a function (imported when called), not at module level


@dataclass(frozen=True)
class Violation:
    imp: Import
    rule: str

    def __str__(self) -> str:
        where = "lazily " if self.imp.lazy else ""
        return f"{self.imp.path}:{self.imp.line}: {where}imports {self.imp.module}: {self.rule}"


def _is(module: str, *prefixes: str) -> bool:
    return any(module == p or module.startswith(p + ".") for p in prefixes)


def imports_of(path: Path) -> Iterator[Import]:
    rel = path.relative_to(ROOT).as_posix()
    tree = ast.parse(path.read_text(), filename=rel)
    package = rel.rsplit("/", 1)[0].replace("/", ".")

    def visit(node: ast.AST, lazy: bool) -> Iterator[Import]:
        for child in ast.iter_child_nodes(node):
            inner = lazy or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))
            if isinstance(child, ast.Import):
                for alias in child.names:
                    yield Import(rel, child.lineno, alias.name, lazy)
            elif isinstance(child, ast.ImportFrom):
                if child.level:  # relative: resolve against this file's package
                    base = package.rsplit(".", child.level - 1)[0] if child.level > 1 else package
                    module = f"{base}.{child.module}" if child.module else base
                else:
                    module = child.module or ""
                # `from pkg import name` may name a module: check pkg.name as well as pkg
                for alias in child.names:
                    yield Import(rel, child.lineno, f"{module}.{alias.name}", lazy)
            yield from visit(child, inner)

    yield from visit(tree, False)


def rule_for(imp: Import) -> str | None:
    """Why this import is not allowed, or None."""
    src = imp.path.split("/", 1)[0]
    mod = imp.module
    if _is(mod, "tests") and src != "tests":
        return "nothing imports tests"
    if _is(mod, "bench") and src not in ("bench", "tests"):
        return "only bench and its tests import bench"
    if src in ("gateway", "kvrelay") and _is(mod, "torch", "triton"):
        if not (imp.path == LAZY_SERVICES_OK and imp.lazy):
            return f"{src} is torch-free"
    if src == "gateway" and _is(mod, "services", "kernels"):
        return "gateway never imports services or kernels"
    if src == "kvrelay" and _is(mod, "services", "kernels", "gateway"):
        if not (imp.path == LAZY_SERVICES_OK and imp.lazy and _is(mod, "services")):
            return "kvrelay starts gateway and services as processes; only cli.py imports services, lazily"
    if src in ("gateway", "services", "kernels", "kvstore") and _is(mod, "kvrelay"):
        if not _is(mod, *KVRELAY_RUNTIME):
            return f"{src} may import kvrelay's runtime modules only ({', '.join(KVRELAY_RUNTIME)})"
    if src == "services" and _is(mod, "gateway"):
        return "services never import gateway"
    if src == "kernels" and _is(mod, "services", "gateway", "kvrelay"):
        return "kernels import only kernels and kvstore.formats"
    if src == "kernels" and _is(mod, "kvstore") and not _is(mod, "kvstore.formats"):
        return "kernels import only kvstore.formats from kvstore"
    if src == "kvstore" and _is(mod, "services", "gateway", "kernels"):
        return "kvstore is the bottom layer: it imports nothing above it"
    return None


def source_files() -> Iterator[Path]:
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            if not path.name.endswith(("_pb2.py", "_pb2_grpc.py")):
                yield path


def violations() -> list[Violation]:
    out = []
    for path in source_files():
        for imp in imports_of(path):
            rule = rule_for(imp)
            if rule is not None:
                out.append(Violation(imp, rule))
    return out


def main() -> int:
    found = violations()
    for v in found:
        print(v)
    print(f"{len(found)} import(s) against the package map" if found else "imports follow the package map")
    return 1 if found else 0


if __name__ == "__main__":
    sys.exit(main())

"""Generate the Python gRPC code of protos/ into kvrelay/v1/ (public API) and kvrelay/internal/v1/ (worker APIs).

The generated files are committed, so the services import them without a build step; tests/kvrelay/test_protos.py
regenerates them into a temporary folder and checks they are byte for byte what is committed. The grpcio-tools
version that made them is written into each generated package's __init__.py, because another version may write
different (equally valid) bytes. The public contract (`kvrelay.v1`: the gateway and the messages it shares) and the
internal one (`kvrelay.internal.v1`: prefill, decode, kvstore) are separate proto packages, as TGI separates its
public and internal protos: a client needs only the first.

Run from anywhere: python scripts/gen_protos.py [--out DIR]
"""

from __future__ import annotations

import argparse
import sys
from importlib import metadata, resources
from pathlib import Path

from grpc_tools import protoc

ROOT = Path(__file__).resolve().parent.parent
PROTO_ROOT = ROOT / "protos"
PACKAGES = (Path("kvrelay") / "v1", Path("kvrelay") / "internal" / "v1")

V1_INIT = '''"""Generated gRPC code of protos/{package}/*.proto. Do not edit: run `python scripts/gen_protos.py`."""

# The grpcio-tools version that generated these files; tests/kvrelay/test_protos.py compares bytes only under it.
GRPC_TOOLS_VERSION = "{version}"
'''


def grpc_tools_version() -> str:
    return metadata.version("grpcio-tools")


def proto_files() -> list[Path]:
    """The .proto sources (absolute paths)."""
    return sorted(p for package in PACKAGES for p in (PROTO_ROOT / package).glob("*.proto"))


def generate(out: Path) -> list[Path]:
    """Write the *_pb2.py, *_pb2.pyi, *_pb2_grpc.py and __init__.py files of each package under out; return them."""
    out.mkdir(parents=True, exist_ok=True)
    # google/protobuf/*.proto ship inside grpc_tools; the CLI adds them itself, protoc.main does not.
    well_known = resources.files("grpc_tools") / "_proto"
    args = [
        "grpc_tools.protoc",
        f"-I{PROTO_ROOT}",
        f"-I{well_known}",
        f"--python_out={out}",
        f"--pyi_out={out}",
        f"--grpc_python_out={out}",
        # protoc names each file by its path under the -I root, so the descriptors embedded in the generated code say
        # kvrelay/v1/<name>.proto (and the imports read `from kvrelay.v1 import ...`) whatever the checkout path.
        *(str(p) for p in proto_files()),
    ]
    if protoc.main(args) != 0:
        raise RuntimeError(f"protoc failed: {' '.join(args)}")
    for package in PACKAGES:
        init = V1_INIT.format(package=package.as_posix(), version=grpc_tools_version())
        (out / package / "__init__.py").write_text(init)
    return sorted(p for package in PACKAGES for p in (out / package).iterdir() if p.is_file())


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--out", type=Path, default=ROOT, help="output root: OUT/kvrelay/v1 and OUT/kvrelay/internal/v1 (default: repo)"
    )
    args = parser.parse_args()
    written = generate(args.out.resolve())
    for path in written:
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())

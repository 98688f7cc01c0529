"""Generate the Python gRPC code of protos/kvrelay/v1/*.proto into the package kvrelay/v1/ (or into --out DIR).

The generated files are committed, so the services import them without a build step; tests/test_protos.py regenerates
them into a temporary folder and checks they are byte for byte what is committed. The grpcio-tools version that made
them is written into kvrelay/v1/__init__.py, because another version may write different (equally valid) bytes.

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
PACKAGE = Path("kvrelay") / "v1"

TOP_INIT = (
    '"""kvrelay\'s gRPC contracts. The code in kvrelay/v1 is generated from protos/ by scripts/gen_protos.py."""\n'
)

V1_INIT = '''"""Generated gRPC code of protos/kvrelay/v1/*.proto. Do not edit: run `python scripts/gen_protos.py`."""

# The grpcio-tools version that generated these files; tests/test_protos.py only compares bytes under the same one.
GRPC_TOOLS_VERSION = "{version}"
'''


def grpc_tools_version() -> str:
    return metadata.version("grpcio-tools")


def proto_files() -> list[Path]:
    """The .proto sources (absolute paths)."""
    return sorted((PROTO_ROOT / PACKAGE).glob("*.proto"))


def generate(out: Path) -> list[Path]:
    """Write the *_pb2.py, *_pb2.pyi, *_pb2_grpc.py and __init__.py files under out/kvrelay/v1; return their paths."""
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
        # kvrelay/v1/x.proto (and the imports read `from kvrelay.v1 import ...`) whatever the checkout path.
        *(str(p) for p in proto_files()),
    ]
    if protoc.main(args) != 0:
        raise RuntimeError(f"protoc failed: {' '.join(args)}")
    (out / "kvrelay" / "__init__.py").write_text(TOP_INIT)
    (out / PACKAGE / "__init__.py").write_text(V1_INIT.format(version=grpc_tools_version()))
    return sorted(p for p in (out / PACKAGE).iterdir() if p.is_file())


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--out", type=Path, default=ROOT, help="output root; files go to OUT/kvrelay/v1 (default: repo)"
    )
    args = parser.parse_args()
    written = generate(args.out.resolve())
    for path in written:
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())

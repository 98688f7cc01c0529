#!/usr/bin/env bash
# The default model's GGUF (94 MB) is larger than the 64 MiB a device call carries. This splits it into two halves
# for two back-to-back calls on the same (warm) GPU machine, where bench/run_gpu.sh puts them together again:
#
#   bash scripts/split_default_gguf.sh            # here: writes .gguf_a/ and .gguf_b/ (git-ignored via info/exclude)
#   call 1, carry [".gguf_a"]:            bash bench/run_gpu.sh gguf-a         (stashes half a in /tmp/kvrelay-gguf)
#   call 2, carry [".devkit", ".gguf_b"]: source .devkit/setup.sh && bash bench/run_gpu.sh gguf-b tests
#
# A machine goes back ~30 s after a call ends: start call 2 at once. gguf-b checks the sha256 of the whole file and
# exports KVRELAY_DEFAULT_GGUF for the stages after it, so the default-model GPU tests run instead of skipping.
set -euo pipefail
cd "$(dirname "$0")/.."
src=$(.venv/bin/python -c "from services.model.default_model import default_gguf_path; print(default_gguf_path())")
size=$(stat -c %s "$src")
half=$(( (size + 1) / 2 ))
rm -rf .gguf_a .gguf_b && mkdir -p .gguf_a .gguf_b
head -c "$half" "$src" > .gguf_a/part
tail -c +"$((half + 1))" "$src" > .gguf_b/part
sha256sum "$src" | cut -d' ' -f1 > .gguf_b/sha256
echo "$(basename "$src")" > .gguf_b/name
for d in .gguf_a .gguf_b; do grep -qx "/$d/" .git/info/exclude 2>/dev/null || echo "/$d/" >> .git/info/exclude; done
echo "split $(basename "$src") ($size bytes) into .gguf_a ($half) and .gguf_b ($((size - half)))"

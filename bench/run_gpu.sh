#!/usr/bin/env bash
# The GPU benchmark and test suite in stages, for a machine with the devkit (Redis, gguf) set up:
#   source .devkit/setup.sh && bash bench/run_gpu.sh ckpt tests kernels model serve
# The default model's GPU tests need its GGUF, too big for one call: scripts/split_default_gguf.sh (gguf-a, gguf-b).
# Results land in bench/results/ (and $OUT when set). The 8B-shape random checkpoint goes to $CKPT (.ckpt/llama3-8b).
set -uo pipefail
export CKPT=${CKPT:-$PWD/.ckpt/llama3-8b}
export KVRELAY_8B_CHECKPOINT=$CKPT
# The 8B test reads $CKPT: without the ckpt stage (in this call or an earlier one on the same machine) it skips
# instead of failing on a missing config.json.
need_ckpt() { [ -f "$CKPT/config.json" ] || { echo "no checkpoint at $CKPT (run the ckpt stage): the 8B test skips"; unset KVRELAY_8B_CHECKPOINT; }; }
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
# The tree travels without .git: pass the commit in (KVRELAY_COMMIT=$(git rev-parse --short HEAD) on the way out).
# The GPU image lacks grpcio-health-checking and grpcio-reflection: carry their wheels in .gpukit (pip download).
if [ -d .gpukit ] && ! python -c "import grpc_health" 2>/dev/null; then
  python -m pip install -q --no-index --no-deps --target /tmp/gpukit-site .gpukit/*.whl && export PYTHONPATH=$PYTHONPATH:/tmp/gpukit-site
fi
log() { echo "=== $(date +%T) $*"; }
for stage in "$@"; do
  case $stage in
    gguf-a)
      # first of two calls carrying the default model's GGUF in halves (scripts/split_default_gguf.sh)
      log "default model, half a"
      mkdir -p /tmp/kvrelay-gguf && cp .gguf_a/part /tmp/kvrelay-gguf/part_a ;;
    gguf-b)
      log "default model, half b"
      name=$(cat .gguf_b/name)
      cat /tmp/kvrelay-gguf/part_a .gguf_b/part > "/tmp/kvrelay-gguf/$name"
      if [ "$(sha256sum "/tmp/kvrelay-gguf/$name" | cut -d' ' -f1)" = "$(cat .gguf_b/sha256)" ]; then
        export KVRELAY_DEFAULT_GGUF=/tmp/kvrelay-gguf/$name
      else
        echo "default model GGUF: sha256 mismatch (was half a stashed on this machine?); its tests will skip"
      fi ;;
    ckpt)
      log "checkpoint"
      [ -f "$CKPT/config.json" ] || python -m kvrelay.cli make-checkpoint --preset llama3-8b --out "$CKPT" --device cuda ;;
    tests)
      log "GPU tests"
      need_ckpt
      python -m pytest -q -s -m gpu -p no:cacheprovider tests/services/test_gpu.py tests/kernels 2>&1 | tail -40 ;;
    tests-model)
      log "GPU tests of whole models (the default model's need gguf-b first)"
      need_ckpt
      python -m pytest -q -s -m gpu -p no:cacheprovider tests/services/test_gpu.py 2>&1 | tail -30 ;;
    kernels)
      log "kernel benchmarks"
      python -m bench.kernel_bench ;;
    model)
      log "model benchmarks"
      python -m bench.model_bench --model "$CKPT" --kv-dtype int8 --decode --prefill ;;
    serve)
      log "client latency"
      python -m bench.serve_latency --model "$CKPT" --kv-dtype int8 ;;
    trace)
      log "hand-off timeline (no records written)"
      python -m bench.serve_latency --model "$CKPT" --kv-dtype int8 --trace ;;
    modes)
      log "colocated vs disaggregated, multi-turn"
      python -m bench.serve_modes --model "$CKPT" --modes "${MODES:-colocated,disaggregated,mps}" ${MODES_ARGS:-} --multiturn ;;
  esac
done
# At most 8 files come back from the GPU machine: the summary, the tables, and whatever RETURN names.
if [ -n "${OUT:-}" ]; then
  cp bench/results/summary.json BENCHMARKS.md "$OUT"/ 2>/dev/null
  for f in ${RETURN:-}; do cp "bench/results/$f" "$OUT"/ 2>/dev/null; done
fi
log "done"

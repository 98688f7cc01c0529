#!/usr/bin/env bash
# temporary device driver (not committed)
source .devkit/setup.sh >/dev/null 2>&1
export PYTHONPATH=$PWD:$PYTHONPATH KVRELAY_COMMIT=${KVRELAY_COMMIT:-unknown}
nvidia-smi --query-gpu=uuid,name,clocks.max.sm,power.limit --format=csv,noheader
[ -f /tmp/ckpt8b/config.json ] || python -m gateway.cli make-checkpoint --preset llama3-8b --out /tmp/ckpt8b --device cuda >/dev/null
for step in "$@"; do
  echo "=== $(date +%T) $step"
  case $step in
    sweep:*) spec=${step#sweep:}; name=${spec%%@*}; rest=${spec#*@}
      python bench/model_bench.py --model /tmp/ckpt8b --kv-dtype int8 --batches ${BATCHES:-64} --sweep "$rest" 2>&1 | grep -v Warning
      cp bench/results/tune_settings.json "$OUT/sweep_$name.json" ;;
    prof:*) bs=${step#prof:}
      python bench/profile_decode.py --model /tmp/ckpt8b --batch $bs --graph 2>&1 | tail -60
      cp bench/results/profile_decode_bs${bs}_ctx1024.txt "$OUT/" 2>/dev/null ;;
    *) eval "$step" ;;
  esac
done
echo "=== $(date +%T) end"

#!/usr/bin/env bash
# Seeds of one training config side by side on one GPU, each stopped after DEADLINE seconds if it has not finished
# (its checkpoints are written atomically: the newest holds the LoRA, copied to OUT/seedS/lora). TF32 matmuls.
#   bash benchmarks/gpu_seeds.sh configs/grpo/shapes-gpu.yaml OUT DEADLINE_S "0 1 2" [key=value ...]
# A second call with resume=latest continues the same folders. Then, on any machine:
#   python benchmarks/bench_lora_gain.py OUT/seed0/lora OUT/seed1/lora ... --proxy shapes-geneval-soft
set -u
config=$1 out=$2 deadline=$3 seeds=$4
shift 4
mkdir -p "$out"
export TORCH_ALLOW_TF32_CUBLAS_OVERRIDE=1 PYTHONUNBUFFERED=1
declare -A pid
for s in $seeds; do
  timeout "$deadline" "${PYTHON:-python3}" -m flowalign.cli train "$config" seed="$s" out="$out/seed$s" \
    threads=1 "$@" > "$out/seed$s.log" 2>&1 &
  pid[$s]=$!
done
for s in $seeds; do
  wait "${pid[$s]}"; rc=$?
  latest=$out/seed$s/checkpoints/latest
  if [ "$rc" != 0 ] && [ -f "$latest" ]; then  # stopped: its LoRA is the newest checkpoint's
    rm -rf "$out/seed$s/lora" && cp -r "$out/seed$s/checkpoints/$(cat "$latest")/lora" "$out/seed$s/lora"
  fi
  echo "seed $s: exit $rc, $(wc -l < "$out/seed$s/metrics.jsonl" 2>/dev/null) metric lines, lora from" \
    "$( [ "$rc" = 0 ] && echo "the end" || cat "$latest" 2>/dev/null)"
done

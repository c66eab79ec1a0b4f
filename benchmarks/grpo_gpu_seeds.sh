#!/usr/bin/env bash
# Seeds of configs/grpo/shapes-gpu.yaml side by side on one GPU, each stopped after DEADLINE seconds if it has not
# finished (its checkpoints, every 5 epochs, are written atomically: the newest holds the LoRA). TF32 matmuls.
#   bash benchmarks/grpo_gpu_seeds.sh OUT DEADLINE_S "0 1 2" [key=value ...]
# then, on any machine: python benchmarks/bench_lora_gain.py OUT/seed0/lora ... --proxy shapes-geneval-soft
set -u
out=$1 deadline=$2 seeds=$3
shift 3
mkdir -p "$out"
export TORCH_ALLOW_TF32_CUBLAS_OVERRIDE=1 PYTHONUNBUFFERED=1
for s in $seeds; do
  timeout "$deadline" "${PYTHON:-python3}" -m flowalign.cli train configs/grpo/shapes-gpu.yaml seed="$s" out="$out/seed$s" \
    threads=1 "$@" > "$out/seed$s.log" 2>&1 &
done
wait
for s in $seeds; do  # a stopped run's LoRA is its newest checkpoint's
  if [ ! -d "$out/seed$s/lora" ] && [ -f "$out/seed$s/checkpoints/latest" ]; then
    cp -r "$out/seed$s/checkpoints/$(cat "$out/seed$s/checkpoints/latest")/lora" "$out/seed$s/lora"
  fi
  echo "seed $s: $(wc -l < "$out/seed$s/metrics.jsonl" 2>/dev/null) metric lines, lora: $(ls "$out/seed$s/lora" 2>/dev/null)"
done

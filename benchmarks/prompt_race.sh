#!/usr/bin/env bash
# Euphonium against Flow-GRPO on a few captions, at a scale that 2 CPU cores can run: the GPU configs
# (configs/{grpo,euphonium}/shapes-gpu.yaml) with 32 prompt groups per epoch (8 optimizer steps), trained on the
# captions of PROMPTS and evaluated every 2 epochs on the same captions (96 samples in all, each caption equally
# often, fixed noise, 20-step ODE, no guidance). One run after another on one core:
#   bash benchmarks/prompt_race.sh grpo|euphonium OUT_ROOT "0 1 2" [EPOCHS] [PROMPTS]
# PROMPTS defaults to benchmarks/prompts/one_position_prompt.txt. benchmarks/plot_prompt_race.py reads the runs.
set -euo pipefail
method=$1; root=$2; seeds=${3:-"0 1 2"}; epochs=${4:-16}
here=$(cd "$(dirname "$0")" && pwd)
prompts=$(realpath "${5:-$here/prompts/one_position_prompt.txt}")
mkdir -p "$root"
n=$(grep -c . "$prompts")
(( 96 % n == 0 )) || { echo "PROMPTS must hold a divisor of 96 captions (1, 2, 3, 4, 6, 8, 12, ...); it has $n" >&2; exit 2; }
eval_file="$root/eval_prompts.txt"  # each caption 96 / n times in a row (bench_lora_gain.py --repeat's order)
awk -v k=$((96 / n)) 'NF { for (i = 0; i < k; i++) print }' "$prompts" > "$eval_file"
for s in $seeds; do
  python -m flowalign.cli train "configs/$method/shapes-gpu.yaml" groups_per_epoch=32 rollout_batch_size=32 \
    train_batch_size=32 reward_kwargs.workers=0 epochs="$epochs" threads=1 seed="$s" progress=true \
    prompts="$prompts" eval_prompts="$eval_file" eval_num=96 eval_every=2 save_every="$epochs" \
    keep_checkpoints=1 out="$root/${method}_seed$s"
done

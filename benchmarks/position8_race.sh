#!/usr/bin/env bash
# Euphonium against Flow-GRPO on 8 position prompts, at a scale that 2 CPU cores can run: the GPU configs
# (configs/{grpo,euphonium}/shapes-gpu.yaml) with 32 prompt groups per epoch, trained on the 8 captions of
# benchmarks/prompts/position8.txt and evaluated every 2 epochs on the same captions (12 samples each, fixed noise,
# 20-step ODE, no guidance). One run after another on one core:
#   bash benchmarks/position8_race.sh grpo|euphonium OUT_ROOT "0 1 2" [EPOCHS]
# benchmarks/plot_position8_race.py OUT_ROOT reads the runs' metrics.jsonl.
set -euo pipefail
method=$1; root=$2; seeds=${3:-"0 1 2"}; epochs=${4:-24}
here=$(cd "$(dirname "$0")" && pwd)
for s in $seeds; do
  python -m flowalign.cli train "configs/$method/shapes-gpu.yaml" groups_per_epoch=32 rollout_batch_size=32 \
    train_batch_size=32 reward_kwargs.workers=0 epochs="$epochs" threads=1 seed="$s" progress=true \
    prompts="$here/prompts/position8.txt" eval_prompts="$here/prompts/position8_x12.txt" eval_num=96 \
    eval_every=2 save_every="$epochs" keep_checkpoints=1 out="$root/${method}_seed$s"
done

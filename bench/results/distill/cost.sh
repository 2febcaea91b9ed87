#!/usr/bin/env bash
# What a teacher costs per step: one epoch of the light plan (rotation, so the targets are computed every
# step) on the shipped cnn3, with and without the shipped ResNet-20 as teacher; the epoch line's img/s.
#   bash bench/results/distill/cost.sh        (from the repository root, machine otherwise idle)
set -euo pipefail
cd "$(dirname "$0")/../../.."
logs=bench/results/distill/logs
common=(--epochs 1 --overwrite --logdir /tmp/distill-cost/tb)
for name in light light_teacher; do
  flags=(); [ "$name" = light_teacher ] && flags=(--teacher model/resnet20.pt)
  echo "\$ python finetune_gpu.py ${common[*]} --output /tmp/distill-cost/$name/best.pt ${flags[*]}" > "$logs/cost_$name.log"
  python finetune_gpu.py "${common[@]}" --output "/tmp/distill-cost/$name/best.pt" "${flags[@]}" >> "$logs/cost_$name.log" 2>&1
done

#!/usr/bin/env bash
# Full-length runs of --preset distill beside the plans it is measured against, one run at a time:
#   own: own model (a), trained by its owner's script on all 60,000 images;
#   light, light30, distill: the light plan as shipped (patience 15), the light plan waiting all 30 epochs as the
#      distill plan does, and the distill plan, each validating on the selection half of the test images
#      (--val-from test-half);
#   compare: all of them on the held-out half, with McNemar's test against the start;
#   cnn3: our shipped cnn3, the distill plan (the deep plan's row is in bench/results/results.md).
#   bash bench/results/distill/full.sh [STEP...]   (from the repository root; steps as above)
set -euo pipefail
cd "$(dirname "$0")/../../.."
logs=bench/results/distill/logs runs=${RUNS:-/tmp/distill-full}
mkdir -p "$logs" "$runs"
own=(--model-path "$runs/own_a.pt" --model-def bench/own_model/mnist-gpu.py:Net --normalize 0.1307 0.3081)
logged() {  # log name, command...
  local log=$logs/full_$1.log; shift
  { echo "# $(date -u +%F), cpu flags: $(grep -m1 -owE 'avx2|avx512_bf16|amx_bf16' /proc/cpuinfo | tr '\n' ' ')"
    echo "\$ $*"; } > "$log"
  "$@" >> "$log" 2>&1
}
steps=("$@"); [ $# -gt 0 ] || steps=(own light light30 distill compare cnn3)
for step in "${steps[@]}"; do
  case $step in
    own) logged own_train python bench/own_model/mnist-gpu.py --save "$runs/own_a.pt" ;;
    light|distill) logged "own_$step" python finetune_gpu.py "${own[@]}" --preset "$step" --val-from test-half \
                     --overwrite --output "$runs/own_$step/best.pt" --logdir "$runs/tb" ;;
    light30) logged own_light30 python finetune_gpu.py "${own[@]}" --preset light --patience 30 \
               --val-from test-half --overwrite --output "$runs/own_light30/best.pt" --logdir "$runs/tb" ;;
    compare) logged own_compare python -m bench.own_model.compare "$runs/own_a.pt" "$runs/own_light/best.pt" \
               "$runs/own_light30/best.pt" "$runs/own_distill/best.pt" --model-def bench/own_model/mnist-gpu.py:Net --normalize 0.1307 0.3081 ;;
    cnn3) logged cnn3_distill python finetune_gpu.py --preset distill --overwrite --output "$runs/cnn3_distill/best.pt" \
            --logdir "$runs/tb" ;;
  esac
done

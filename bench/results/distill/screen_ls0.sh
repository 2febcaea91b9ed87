#!/usr/bin/env bash
# The screen's second part: a ResNet-20 trained without label smoothing as the teacher (alone, and with the
# shipped one), at alpha 0.5. Its checkpoint is made first, as logs/resnet20-ls0.log records:
#   python finetune_gpu.py --preset resnet20 --label-smoothing 0 --output /tmp/distill/resnet20-ls0/best.pt ...
#   bash bench/results/distill/screen_ls0.sh        (from the repository root, in the project's environment)
set -euo pipefail
cd "$(dirname "$0")/../../.."
logs=bench/results/distill/logs
ls0=/tmp/distill/resnet20-ls0/best.pt
common=(--augment none --epochs 3 --overwrite --logdir /tmp/distill-screen/tb --kd-alpha 0.5)
run() {  # name, flags...
  local name=$1; shift
  echo "\$ python finetune_gpu.py ${common[*]} --output /tmp/distill-screen/$name/best.pt $*" > "$logs/screen_$name.log"
  python finetune_gpu.py "${common[@]}" --output "/tmp/distill-screen/$name/best.pt" "$@" >> "$logs/screen_$name.log" 2>&1
}
for t in 1 2; do
  run "resnet20-ls0_a0.5_t$t" --teacher "$ls0" --kd-temperature "$t"
done
run "both_a0.5_t1" --teacher "$ls0" model/resnet20.pt --kd-temperature 1

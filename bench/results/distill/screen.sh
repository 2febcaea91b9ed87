#!/usr/bin/env bash
# The distillation screen: the shipped cnn3 taught by the shipped ResNet-20, --augment none (the teacher's
# targets computed once), 3 epochs, for each (alpha, T), beside the same run without a teacher. One run at a time.
#   bash bench/results/distill/screen.sh        (from the repository root, in the project's environment)
set -euo pipefail
cd "$(dirname "$0")/../../.."
logs=bench/results/distill/logs
mkdir -p "$logs"
common=(--augment none --epochs 3 --overwrite --logdir /tmp/distill-screen/tb)
run() {  # name, flags...
  local name=$1; shift
  echo "\$ python finetune_gpu.py ${common[*]} --output /tmp/distill-screen/$name/best.pt $*" > "$logs/screen_$name.log"
  python finetune_gpu.py "${common[@]}" --output "/tmp/distill-screen/$name/best.pt" "$@" >> "$logs/screen_$name.log" 2>&1
}
run none
for alpha in 0.5 0.9; do
  for t in 1 2 4; do
    run "resnet20_a${alpha}_t${t}" --teacher model/resnet20.pt --kd-alpha "$alpha" --kd-temperature "$t"
  done
done

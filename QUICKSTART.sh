#!/usr/bin/env bash
# Quick start: set up what is missing, check the base model, fine-tune it, show how to watch it.
#
#   bash QUICKSTART.sh                 # the full default run (model/mnist_cnn3.pt, 30 epochs)
#   bash QUICKSTART.sh --smoke         # a one-minute run on a subset, to see that everything works
#   bash QUICKSTART.sh -- --preset deep --device cuda   # flags after -- go to finetune_gpu.py
#
# Stops at the first failing step with a message saying which one.
set -euo pipefail
cd "$(dirname "$0")"

usage() {
  sed -n '2,8p' "$0" | sed 's/^# \{0,1\}//'
}

smoke=0
extra=()
while [ $# -gt 0 ]; do
  case "$1" in
    -h|--help) usage; exit 0 ;;
    --smoke) smoke=1 ;;
    --) shift; extra=("$@"); break ;;
    *) echo "QUICKSTART.sh: unknown option $1 (see --help)" >&2; exit 2 ;;
  esac
  shift
done

step() { echo; echo "== step $1"; }
fail() { echo "QUICKSTART.sh: step '$1' failed; fix the message above and run again." >&2; exit 1; }

step "0/3: set-up (packages, Fashion-MNIST)"
if [ "${QUICKSTART_SKIP_SETUP:-0}" = 1 ]; then
  echo "skipped (QUICKSTART_SKIP_SETUP=1)"
else
  bash scripts/setup.sh || fail "set-up"
fi
# The interpreter the set-up installed into: the active venv or conda env, else the project's .venv.
PY=$(bash scripts/setup.sh --print-python) || fail "set-up"
[ -x "$PY" ] || { echo "$PY does not exist: run bash scripts/setup.sh" >&2; fail "set-up"; }

step "1/3: pre-flight check of the base model"
"$PY" test_model.py || fail "pre-flight check"

step "2/3: fine-tune"
if [ "$smoke" = 1 ]; then
  out=result/smoke/mnist_cnn_finetuned.pt
  args=(--epochs 1 --limit-train 2048 --val-size 1000 --output "$out" --run-name quickstart_smoke --overwrite)
  more=2  # the resume line below: one more epoch
else
  out=result/mnist_cnn_finetuned.pt
  args=(--output "$out")
  more=40
fi
"$PY" finetune_gpu.py "${args[@]}" "${extra[@]+"${extra[@]}"}" || fail "fine-tune"
"$PY" test_model.py --model-path "$out" || fail "check of the fine-tuned model"

step "3/3: watch the run"
if [ "$PY" = "$PWD/.venv/bin/python" ]; then
  activate="source .venv/bin/activate        # once per shell (skip if you use your own venv/conda env)"
else
  activate="# python is $PY (the active environment)"
fi
cat <<EOF
The commands below use the project's python:
    $activate
TensorBoard (accuracy, validation loss, learning rate, confusion matrix, misclassified images):
    tensorboard --logdir logs_finetune
Next:
    python test_model.py --model-path $out --full                      # all 10,000 test images
    python finetune_gpu.py --model-path $out --lr 0.0005 --output result/round2/best.pt   # a second round
    python finetune_gpu.py --preset deep --output result/deep/best.pt     # the longest plan
    python finetune_gpu.py --resume $(dirname "$out")/last.pt --epochs $more    # train a bit more
EOF

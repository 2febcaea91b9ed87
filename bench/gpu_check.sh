#!/usr/bin/env bash
# GPU check for issue 4: pre-flight, the side-by-side benchmark, a 3-epoch fine-tune and a torchrun run,
# all on CUDA, printing every number. Under 4 minutes on an H100/H200.
#
# How to run (from the repository root, on a machine with a CUDA GPU and the packages installed):
#   mkdir -p .gpu/fashion-mnist && cp /usr/share/datasets/fashion-mnist/*.gz .gpu/fashion-mnist/
#   bash bench/gpu_check.sh                      # or: FASHION_MNIST_DIR=/some/folder bash bench/gpu_check.sh
# This script copies nothing: the data must already be in $FASHION_MNIST_DIR or ./.gpu/fashion-mnist
# (.gpu/ is git-ignored: with the device tool, name ".gpu" in carry so that the data travels, and run
#  `bash bench/gpu_check.sh` as the command, with a timeout of about 300 s).
# Outputs go to a temporary folder ($OUT_DIR, default: a new mktemp -d), removed at the end unless
# KEEP_OUT=1; the benchmark's JSON is also copied to $OUT when that is set (the device tool's folder).
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python}
export FASHION_MNIST_DIR=${FASHION_MNIST_DIR:-$PWD/.gpu/fashion-mnist}
export PYTHONUNBUFFERED=1
MODEL=${MODEL:-model/mnist_cnn3.pt}
OUT_DIR=${OUT_DIR:-$(mktemp -d -t gpu-check-XXXXXX)}
[[ ${KEEP_OUT:-0} == 1 ]] || trap 'rm -rf "$OUT_DIR"' EXIT

if ! ls "$FASHION_MNIST_DIR"/train-images-idx3-ubyte* >/dev/null 2>&1; then
    echo "gpu_check: no Fashion-MNIST in $FASHION_MNIST_DIR (copy the four IDX files there first)" >&2
    exit 1
fi

# The fine-tunes start from the shipped model when there is one, else from scratch (same speed).
if [[ -f $MODEL ]]; then START=(--model-path "$MODEL"); else START=(--from-scratch); fi

step() {  # step NAME CMD...: run one check with a banner and its wall time
    local name=$1 t0=$SECONDS
    shift
    echo "=== $name: $*"
    "$@"
    echo "=== $name: done in $((SECONDS - t0)) s"
}

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
"$PYTHON" -c 'import torch; print("torch", torch.__version__, "cuda", torch.version.cuda, torch.cuda.get_device_name(0))'

if [[ -f $MODEL ]]; then
    step preflight "$PYTHON" test_model.py --require-gpu --device cuda --model-path "$MODEL"
else
    echo "=== preflight: skipped, no $MODEL"
fi

step benchmark "$PYTHON" bench/bench_throughput.py --device cuda --json "$OUT_DIR/bench_cuda.json"
if [[ -n ${OUT:-} ]]; then cp "$OUT_DIR/bench_cuda.json" "$OUT/"; fi

step finetune-3-epochs "$PYTHON" finetune_gpu.py "${START[@]}" --epochs 3 --device cuda \
    --output "$OUT_DIR/ft3/model.pt" --logdir "$OUT_DIR/tb" --overwrite
cat "$OUT_DIR/ft3/metrics.json" 2>/dev/null || true
echo

step torchrun-1-gpu torchrun --standalone --nproc_per_node=1 finetune_gpu.py "${START[@]}" --epochs 1 \
    --device cuda --output "$OUT_DIR/ddp/model.pt" --logdir "$OUT_DIR/tb" --overwrite
cat "$OUT_DIR/ddp/metrics.json" 2>/dev/null || true
echo
echo "=== gpu_check: all steps passed in $SECONDS s"

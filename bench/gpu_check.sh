#!/usr/bin/env bash
# GPU check, in one go on a fresh CUDA machine: imports and data, the pre-flight check (--require-gpu),
# a 3-epoch fine-tune, a torchrun fine-tune on every visible GPU (DDP over NCCL) and the throughput
# benchmark. Every step runs even when an earlier one failed; each is reported as passed or failed with
# its seconds, and the script exits 1 if any failed. Each step has a time limit, so the whole check ends
# within 8 minutes and the report is always written. Only a machine with no usable CUDA GPU (a CPU-only
# torch, CUDA not available, no such device) stops it first: one line says why, the report is written with
# that reason and a failed step "gpu", and it exits 1 without running the steps.
#
#   mkdir -p .gpu/fashion-mnist && cp /usr/share/datasets/fashion-mnist/*.gz .gpu/fashion-mnist/
#   bash bench/gpu_check.sh
# (.gpu/ is git-ignored: with the device tool, name ".gpu" in carry so that the data travels, and give
#  the command a timeout of 600 s.)
#
# Writes gpu_check.json (GPU, versions, AMP policy, every step, benchmark ratios, peak memory, test
# accuracy), gpu_check.log (everything printed) and the raw bench.json/metrics.json files to $OUT when it
# is set, else to the work folder ($GPU_CHECK_WORK, default a new temporary folder), which is kept.
# Environment: PYTHON (default python3), FASHION_MNIST_DIR (default ./.gpu/fashion-mnist), MODEL.
# A CPU rehearsal (the tests): GPU_CHECK_DEVICE=cpu, GPU_CHECK_NPROC, GPU_CHECK_EPOCHS, and extra flags
# (split on spaces) in GPU_CHECK_PREFLIGHT_ARGS, GPU_CHECK_FT_ARGS, GPU_CHECK_BENCH_ARGS.
set -uo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3}
DEVICE=${GPU_CHECK_DEVICE:-cuda}
MODEL=${MODEL:-model/mnist_cnn3.pt}
EPOCHS=${GPU_CHECK_EPOCHS:-3}
export FASHION_MNIST_DIR=${FASHION_MNIST_DIR:-$PWD/.gpu/fashion-mnist}
export PYTHONUNBUFFERED=1
WORK=${GPU_CHECK_WORK:-$(mktemp -d -t gpu-check-XXXXXX)}
REPORT_DIR=${OUT:-$WORK}
BUDGET_S=${GPU_CHECK_BUDGET_S:-450}  # the benchmark gets what the other steps left of this
read -ra PREFLIGHT_ARGS <<< "${GPU_CHECK_PREFLIGHT_ARGS:-}"
read -ra FT_ARGS <<< "${GPU_CHECK_FT_ARGS:-}"
read -ra BENCH_ARGS <<< "${GPU_CHECK_BENCH_ARGS:-}"

step() {  # step NAME LIMIT_S CMD...: run one check under a time limit and record passed/failed, never stop
  local name=$1 limit=$2 t0=$EPOCHREALTIME rc result
  shift 2
  echo "=== $name: $*"
  if declare -F "$1" >/dev/null; then "$@"; else timeout --kill-after=10 "$limit" "$@"; fi
  rc=$?
  result=$(record "$name" "$rc" "$t0")
  echo "=== $name: ${result% *} (exit $rc$([ "$rc" = 124 ] && echo ", over its $limit s limit")) in ${result#* } s"
  echo
}

record() {  # record NAME EXIT_CODE START: append NAME's line to steps.tsv and print "passed|failed SECONDS"
  local status=passed secs
  secs=$(awk -v a="$3" -v b="$EPOCHREALTIME" 'BEGIN { printf "%.1f", b - a }')
  [ "$2" = 0 ] || status=failed
  printf '%s\t%s\t%s\t%s\n' "$1" "$status" "$2" "$secs" >> "$WORK/steps.tsv"
  echo "$status $secs"
}

no_gpu_reason() {  # why DEVICE (cuda, cuda:N) cannot be used, in one line; nothing when it can, and nothing
  # when torch cannot be imported at all (the imports step then names what is missing)
  local reason rc
  reason=$(DEVICE="$DEVICE" timeout --kill-after=5 60 "$PYTHON" - 2>/dev/null <<'EOF'
import os, sys, warnings

def unusable(why):
    print(f"torch {torch.__version__}: {why}")
    sys.exit(0)

try:
    import torch
except Exception:
    sys.exit(0)
if not torch.backends.cuda.is_built():
    unusable("built without CUDA")
with warnings.catch_warnings(record=True) as caught:  # is_available() hides why; its warnings and init() say
    warnings.simplefilter("always")
    available, count = torch.cuda.is_available(), torch.cuda.device_count()
if not available:
    why = [str(w.message) for w in caught]
    try:
        torch.cuda.init()
    except Exception as e:
        why.insert(0, str(e))
    # the first sentence, on one line: "Found no NVIDIA driver on your system", "No CUDA GPUs are available"
    why = " ".join(why[0].split()).split(". ")[0].rstrip(".") if why else "no reason given"
    unusable(f"CUDA not available: {why}")
index = torch.device(os.environ["DEVICE"]).index or 0
if index >= count:
    unusable(f"{count} devices" + (f", {os.environ['DEVICE']} asked for" if index else ""))
EOF
  )
  rc=$?
  [ "$rc" = 0 ] || reason="the CUDA check by $PYTHON failed (exit $rc$([ "$rc" = 124 ] && echo ", over 60 s"))"
  echo "$reason"
}

check_imports() {
  "$PYTHON" - <<'EOF'
import importlib.util, sys
missing = [m for m in ("torch", "torchvision", "tensorboard", "numpy") if importlib.util.find_spec(m) is None]
if missing:
    sys.exit(f"gpu_check: {sys.executable} cannot import {', '.join(missing)}; install requirements.txt")
import torch
print("python", sys.version.split()[0], "torch", torch.__version__, "CUDA", torch.version.cuda,
      "GPUs", torch.cuda.device_count())
EOF
}

check_data() {
  ls "$FASHION_MNIST_DIR"/train-images-idx3-ubyte* "$FASHION_MNIST_DIR"/t10k-images-idx3-ubyte* >/dev/null 2>&1 \
    && echo "Fashion-MNIST in $FASHION_MNIST_DIR" \
    || { echo "gpu_check: no Fashion-MNIST in $FASHION_MNIST_DIR (copy the four IDX files there)" >&2; return 1; }
}

processes() {  # torchrun's --nproc_per_node: every visible GPU, at least 1
  [ -n "${GPU_CHECK_NPROC:-}" ] && { echo "$GPU_CHECK_NPROC"; return; }
  "$PYTHON" -c 'import torch; print(max(1, torch.cuda.device_count()))' 2>/dev/null || echo 1
}

run_steps() {
  local nproc require=()
  [ "$DEVICE" = cpu ] || require=(--require-gpu)
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null || true
  step imports 60 check_imports
  step data 5 check_data
  step preflight 75 "$PYTHON" test_model.py "${require[@]}" --device "$DEVICE" --model-path "$MODEL" "${PREFLIGHT_ARGS[@]}"
  step finetune 120 "$PYTHON" finetune_gpu.py --model-path "$MODEL" --epochs "$EPOCHS" --device "$DEVICE" \
      --output "$WORK/ft/model.pt" --logdir "$WORK/tb" --run-name gpu_check_ft --overwrite "${FT_ARGS[@]}"
  nproc=$(processes)
  step torchrun 100 "$PYTHON" -m torch.distributed.run --standalone --nproc_per_node="$nproc" finetune_gpu.py \
      --model-path "$MODEL" --epochs 1 --device "$DEVICE" --output "$WORK/ddp/model.pt" --logdir "$WORK/tb" \
      --run-name gpu_check_ddp --overwrite "${FT_ARGS[@]}"
  step benchmark $((SECONDS < BUDGET_S - 60 ? BUDGET_S - SECONDS : 60)) "$PYTHON" -m bench.bench_throughput --device "$DEVICE" --json "$WORK/bench.json" "${BENCH_ARGS[@]}"
  for f in ft/metrics.json ddp/metrics.json bench.json; do
    [ "$REPORT_DIR" = "$WORK" ] || [ ! -f "$WORK/$f" ] || cp "$WORK/$f" "$REPORT_DIR/${f//\//_}"
  done
  GPU_CHECK_NPROC_USED=$nproc write_report
}

write_report() {  # gpu_check.json from steps.tsv, the runs' metrics.json and the benchmark's JSON
  REPORT="$REPORT_DIR/gpu_check.json" WORK="$WORK" DEVICE="$DEVICE" "$PYTHON" - <<'EOF'
import json, os
from pathlib import Path

work, device = Path(os.environ["WORK"]), os.environ["DEVICE"]
no_gpu = os.environ.get("GPU_CHECK_NO_GPU")  # set: there was no usable GPU, so no step ran; it says why
nproc = os.environ.get("GPU_CHECK_NPROC_USED")

def read_json(path):
    try:
        return json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return {}

def peak_gpu_mb(metrics):
    rows = [r for v in metrics.values() if isinstance(v, list) for r in v if isinstance(r, dict)]
    peaks = [r["peak_gpu_mb"] for r in [metrics, *rows] if r.get("peak_gpu_mb") is not None]
    return max(peaks, default=None)

def machine():
    info = {"device": device}
    try:
        import torch
        info.update(torch=torch.__version__, cuda=torch.version.cuda, cudnn=torch.backends.cudnn.version(),
                    gpu_count=torch.cuda.device_count())
        dev = torch.device(device)
        if no_gpu:  # nothing more to read: the GPU, its capability and so its AMP policy are what is missing
            raise LookupError(f"no usable CUDA GPU ({no_gpu})")
        if dev.type == "cuda":
            info.update(gpu_name=torch.cuda.get_device_name(dev),
                        capability=".".join(map(str, torch.cuda.get_device_capability(dev))))
        from fashion_ft.system import resolve_amp
        info["amp_policy"] = resolve_amp("auto", dev).name
    except Exception as e:  # the report must still be written: say what could not be read
        info["error"] = str(e) if no_gpu and isinstance(e, LookupError) else f"{type(e).__name__}: {e}"
    return info

steps = []
for line in (work / "steps.tsv").read_text().splitlines():
    name, status, code, secs = line.split("\t")
    steps.append({"name": name, "status": status, "exit_code": int(code), "seconds": float(secs),
                  "timed_out": code in ("124", "137")})
ft, ddp, bench = read_json(work / "ft/metrics.json"), read_json(work / "ddp/metrics.json"), read_json(work / "bench.json")
report = {**machine(), "passed": all(s["status"] == "passed" for s in steps), "steps": steps,
          "train_speedup": bench.get("train_speedup"), "eval_speedup": bench.get("eval_speedup"),
          "peak_gpu_mb": peak_gpu_mb(ft), "test_acc": ft.get("test_acc"),
          "torchrun": {"nproc_per_node": int(nproc) if nproc else None,
                       "world_size": ddp.get("world_size"), "backend": ddp.get("backend"),
                       "test_acc": ddp.get("test_acc")}}
Path(os.environ["REPORT"]).write_text(json.dumps(report, indent=2) + "\n")
if not no_gpu:  # else its one line has said it all
    print(json.dumps(report, indent=2))
EOF
}

stop_without_gpu() {  # on cuda with no usable GPU: say why in one line, write the report (step "gpu" failed), return 1
  local t0=$EPOCHREALTIME reason written=0
  [[ $DEVICE == cuda* ]] || return 0
  reason=$(no_gpu_reason)
  [ -n "$reason" ] || return 0
  record gpu 1 "$t0" >/dev/null
  GPU_CHECK_NO_GPU=$reason write_report >/dev/null 2>&1 || written=$?
  echo "gpu_check: no usable CUDA GPU ($reason); nothing to check (report: $REPORT_DIR/gpu_check.json)"
  [ "$written" = 0 ] || echo "gpu_check: could not write the report" >&2
  return 1
}

main() {
  local failed
  stop_without_gpu || return 1
  run_steps || { echo "gpu_check: could not write the report" >&2; return 1; }
  failed=$(awk -F'\t' '$2 != "passed" { printf "%s ", $1 }' "$WORK/steps.tsv")
  if [ -n "$failed" ]; then
    echo "=== gpu_check: FAILED: ${failed% } (report: $REPORT_DIR/gpu_check.json)"
    return 1
  fi
  echo "=== gpu_check: every step passed in $SECONDS s (report: $REPORT_DIR/gpu_check.json)"
}

mkdir -p "$WORK" "$REPORT_DIR" && : > "$WORK/steps.tsv" || exit 1
main 2>&1 | tee "$REPORT_DIR/gpu_check.log"
exit "${PIPESTATUS[0]}"

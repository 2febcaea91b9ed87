"""bench/gpu_check.sh rehearsed on the CPU: every step runs, each is reported, one failure fails the check."""

import json
import os
import subprocess
import sys

import pytest
from conftest import REPO

STEPS = ["imports", "data", "preflight", "finetune", "torchrun", "benchmark"]
TINY_RUN = "--limit-train 512 --val-size 200 --batch-size 64 --eval-batch-size 500 --quiet"


def gpu_check(tmp_path, python=sys.executable, unset=(), **env_extra):
    env = {**os.environ, "PYTHON": str(python), "GPU_CHECK_DEVICE": "cpu", "GPU_CHECK_NPROC": "1",
           "GPU_CHECK_EPOCHS": "1", "GPU_CHECK_FT_ARGS": TINY_RUN, "GPU_CHECK_BENCH_ARGS": "--tiny --workers 0",
           "GPU_CHECK_WORK": str(tmp_path / "work"), "OUT": str(tmp_path / "out"), "OMP_NUM_THREADS": "1",
           **env_extra}
    for name in unset:
        env.pop(name, None)
    result = subprocess.run(["bash", "bench/gpu_check.sh"], cwd=REPO, capture_output=True, text=True,
                            timeout=300, env=env)
    report = json.loads((tmp_path / "out" / "gpu_check.json").read_text())
    log = (tmp_path / "out" / "gpu_check.log").read_text()
    return result, report, log


def statuses(report):
    return {s["name"]: s["status"] for s in report["steps"]}


@pytest.mark.slow
def test_a_failing_step_does_not_hide_the_others(tmp_path, small_data_dir, trained_checkpoint):
    """The pre-flight is made to fail (no model reaches 100%); the runs and the benchmark still run and pass."""
    result, report, log = gpu_check(tmp_path, FASHION_MNIST_DIR=str(small_data_dir), MODEL=str(trained_checkpoint),
                                    GPU_CHECK_PREFLIGHT_ARGS="--min-accuracy 1")
    assert result.returncode == 1, result.stdout[-3000:]
    assert [s["name"] for s in report["steps"]] == STEPS
    assert statuses(report) == {**dict.fromkeys(STEPS, "passed"), "preflight": "failed"}, log[-4000:]
    assert all(s["seconds"] >= 0 for s in report["steps"]) and not report["passed"]
    assert report["device"] == "cpu" and report["torch"]
    assert report["amp_policy"] in ("bf16", "off")  # AmpPolicy.name: "off" is plain fp32
    assert report["train_speedup"] > 0 and report["eval_speedup"] > 0
    assert 0 < report["test_acc"] <= 1 and report["peak_gpu_mb"] is None  # no GPU memory on the CPU
    assert report["torchrun"]["nproc_per_node"] == 1 and report["torchrun"]["world_size"] == 1
    assert 0 < report["torchrun"]["test_acc"] <= 1
    assert "=== preflight: failed (exit 1)" in log and "FAILED: preflight" in log
    assert (tmp_path / "out" / "bench.json").is_file() and (tmp_path / "out" / "ft_metrics.json").is_file()


def test_missing_packages_are_named_and_every_step_is_still_reported(tmp_path):
    """A python that cannot import torch (site-packages switched off): a report, not a crash."""
    stub = tmp_path / "python3"
    stub.write_text(f'#!/bin/sh\nexec "{sys.executable}" -S "$@"\n')
    stub.chmod(0o755)
    result, report, log = gpu_check(tmp_path, python=stub, FASHION_MNIST_DIR=str(tmp_path / "nothing"))
    assert result.returncode == 1
    assert statuses(report) == dict.fromkeys(STEPS, "failed")
    assert "cannot import torch, torchvision, tensorboard, numpy" in log
    assert "no Fashion-MNIST in" in log and "FAILED: imports data preflight finetune torchrun benchmark" in log
    assert "ModuleNotFoundError" in report["error"] and report["test_acc"] is None


def test_without_a_usable_gpu_it_says_why_once_and_runs_no_step(tmp_path):
    """The default device (cuda) with no GPU to use (CUDA_VISIBLE_DEVICES empty hides any, so this holds on
    every machine): one line first says why, the report says it too, and no step runs."""
    result, report, log = gpu_check(tmp_path, unset=["GPU_CHECK_DEVICE"], CUDA_VISIBLE_DEVICES="",
                                    FASHION_MNIST_DIR=str(tmp_path / "nothing"))
    output = result.stdout + result.stderr
    assert result.returncode == 1, output[-3000:]
    lines = [line for line in output.splitlines() if "no usable CUDA GPU" in line]
    assert len(lines) == 1, output[-3000:]
    assert output.splitlines()[0] == lines[0] and lines[0].startswith("gpu_check: no usable CUDA GPU (torch ")
    assert "nothing to check" in lines[0] and str(tmp_path / "out" / "gpu_check.json") in lines[0]
    assert any(why in lines[0] for why in ("built without CUDA", "CUDA not available: ", " 0 devices"))
    assert "Traceback" not in output and "===" not in output and log == result.stdout
    reason = lines[0].split("(", 1)[1].rsplit("); nothing to check", 1)[0]
    assert report["device"] == "cuda" and not report["passed"] and reason in report["error"]
    assert report["steps"] == [{"name": "gpu", "status": "failed", "exit_code": 1,
                                "seconds": report["steps"][0]["seconds"], "timed_out": False}]
    assert report["test_acc"] is None and report["torchrun"]["nproc_per_node"] is None
    assert not (tmp_path / "work" / "ft").exists() and not (tmp_path / "out" / "bench.json").exists()

"""torchrun + DistributedDataParallel on the CPU (gloo): two processes behave like one with the same
global batch, and only rank 0 writes."""

import json
import shutil
import subprocess
import sys

import pytest
import torch
from conftest import REPO, run_script

TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
COMMON = ("--val-size", "500", "--eval-batch-size", "500", "--device", "cpu", "--limit-train", "1024",
          "--epochs", "2", "--quiet")


def torchrun(*args, timeout=300):
    return subprocess.run([*TORCHRUN, str(REPO / "finetune_gpu.py"), *map(str, args)], cwd=REPO,
                          capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def ddp_run(tmp_path_factory, small_data_dir, trained_checkpoint):
    out = tmp_path_factory.mktemp("ddp")
    result = torchrun("--model-path", trained_checkpoint, "--data-dir", small_data_dir, "--batch-size", 32,
                      "--output", out / "run" / "best.pt", "--logdir", out / "tb", *COMMON)
    return result, out


def test_two_processes_write_one_checkpoint_and_one_run(ddp_run):
    result, out = ddp_run
    assert result.returncode == 0, result.stderr[-2000:]
    metrics = json.loads((out / "run" / "metrics.json").read_text())
    assert metrics["world_size"] == 2 and metrics["global_batch_size"] == 64
    assert result.stdout.count("done (") == 1  # rank 0 alone prints
    assert sorted(p.name for p in (out / "run").iterdir()) == ["best.pt", "last.pt", "metrics.json"]
    assert len(list((out / "tb").iterdir())) == 1
    state = torch.load(out / "run" / "best.pt", weights_only=True)["model"]
    assert not any(k.startswith("module.") for k in state)  # the plain model: loads anywhere


def test_ddp_matches_one_process_with_the_same_global_batch(ddp_run, tmp_path, small_data_dir, trained_checkpoint):
    _, out = ddp_run
    single = run_script("finetune_gpu.py", "--model-path", trained_checkpoint, "--data-dir", small_data_dir,
                        "--batch-size", 64, "--output", tmp_path / "one" / "best.pt", "--logdir", tmp_path / "tb",
                        *COMMON)
    assert single.returncode == 0, single.stderr
    ddp = json.loads((out / "run" / "metrics.json").read_text())
    one = json.loads((tmp_path / "one" / "metrics.json").read_text())
    # the same images per step; only BatchNorm statistics (per rank) and augmentation draws differ
    assert abs(ddp["best_val_acc"] - one["best_val_acc"]) < 0.03


def test_ddp_checkpoint_passes_test_model_and_resumes_in_one_process(ddp_run, tmp_path, small_data_dir):
    _, out = ddp_run
    check = run_script("test_model.py", "--model-path", out / "run" / "best.pt", "--data-dir", small_data_dir)
    assert check.returncode == 0, check.stdout
    shutil.copytree(out / "run", tmp_path / "run")
    resumed = run_script("finetune_gpu.py", "--resume", tmp_path / "run" / "last.pt", "--epochs", 3,
                         "--output", tmp_path / "run" / "best.pt", "--quiet")
    assert resumed.returncode == 0, resumed.stderr
    assert torch.load(tmp_path / "run" / "last.pt", weights_only=True)["epoch"] == 3


def test_a_failing_rank_fails_the_job_with_its_message(tmp_path, small_data_dir):
    result = torchrun("--model-path", tmp_path / "missing.pt", "--data-dir", small_data_dir,
                      "--batch-size", 32, "--output", tmp_path / "o" / "best.pt", *COMMON, timeout=120)
    assert result.returncode != 0
    assert "checkpoint not found" in result.stderr and "rank 1" in result.stderr

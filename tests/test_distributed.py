"""torchrun + DistributedDataParallel on the CPU (gloo): two processes behave like one with the same
global batch, only rank 0 writes, a resume may change the number of processes, and a failure on one
rank stops every rank with a clear message. The collective helpers are tested in two gloo processes
started here; the rest is unit tests with the process-group calls replaced."""

import contextlib
import json
import math
import multiprocessing
import os
import shutil
import signal
import subprocess
import sys
import time
import traceback
from pathlib import Path
from unittest import mock

import pytest
import torch
import torch.distributed as tdist
from conftest import REPO, TINY, TINY_RESNET, caused, run_script

from fashion_ft import system
from fashion_ft.config import Config
from fashion_ft.data import DeviceData
from fashion_ft.engine import ComputeSettings, ModelEma, lr_multiplier, train_one_epoch
from fashion_ft.errors import DivergenceError, UserError
from fashion_ft.model import build_model

# No dropout, no augmentation, BatchNorm frozen: each image's loss does not depend on how the batch is
# split across processes, so two processes of 32 compute what one process of 64 computes.
SMALL = ("--val-size", "500", "--eval-batch-size", "500", "--device", "cpu", "--amp", "off", "--limit-train", "1024",
         "--quiet", "--augment", "none", "--freeze-bn")
# SGD for the DDP-against-one-process pair: AdamW divides each step by the gradient's own size, so the
# order of floating-point sums changes its near-zero entries by a whole step and the two runs drift apart.
# At a learning rate that improves the model: one that wrecks it (0.05 does) amplifies those rounding
# differences until the pair disagrees on some CPUs.
SGD = ("--optimizer", "sgd", "--lr", "0.01")


def torchrun_command(*args, nproc=2) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
            str(REPO / "finetune_gpu.py"), *map(str, args)]


def torchrun(*args, nproc=2, env=None):
    return subprocess.run(torchrun_command(*args, nproc=nproc), cwd=REPO, capture_output=True, text=True, timeout=300,
                          env={**os.environ, **(env or {})})


# ---------------------------------------------------------------- unit tests, no process group

@pytest.mark.parametrize("env, expected", [
    ({}, system.DistInfo()),
    ({"WORLD_SIZE": "1"}, system.DistInfo()),  # not torchrun: no RANK
    ({"RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0", "LOCAL_WORLD_SIZE": "1"},
     system.DistInfo(0, 1, 0, 1, launched=True)),
    ({"RANK": "3", "WORLD_SIZE": "4", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "2"},
     system.DistInfo(3, 4, 1, 2, launched=True)),
])
def test_any_torchrun_environment_takes_the_distributed_path(env, expected):
    info = system.from_environment(env)
    assert info == expected
    assert info.enabled == bool(env.get("RANK"))  # torchrun --nproc_per_node=1 included


def test_each_rank_makes_its_gpu_current_before_the_nccl_group(monkeypatch):
    calls = []
    monkeypatch.setattr(tdist, "is_initialized", lambda: False)
    monkeypatch.setattr(torch.cuda, "set_device", lambda device: calls.append(("set_device", device)))
    monkeypatch.setattr(tdist, "init_process_group",
                        lambda backend, **kw: calls.append(("init", backend, kw.get("device_id"))))
    system.init(system.DistInfo(1, 2, 1, 2, launched=True), torch.device("cuda", 1))
    assert calls == [("set_device", torch.device("cuda", 1)), ("init", "nccl", torch.device("cuda", 1))]
    calls.clear()
    system.init(system.DistInfo(0, 1, 0, 1, launched=True), torch.device("cpu"))
    assert calls == [("init", "gloo", None)]  # one process under torchrun still gets a group
    calls.clear()
    system.init(system.DistInfo(), torch.device("cpu"))
    assert calls == []


@pytest.mark.parametrize("info, fails, expected", [
    (system.DistInfo(0, 2, 0, 2, launched=True), False, ["block", "barrier"]),
    (system.DistInfo(1, 2, 1, 2, launched=True), False, ["barrier", "block"]),
    (system.DistInfo(0, 2, 0, 2, launched=True), True, ["barrier"]),  # the others go on, and fail on their own
    (system.DistInfo(), False, ["block"]),
])
def test_local_rank_zero_runs_the_block_first_and_always_releases_the_others(monkeypatch, info, fails, expected):
    events = []
    monkeypatch.setattr(system, "barrier", lambda: events.append("barrier"))
    with contextlib.suppress(UserError), system.main_process_first(info):
        if fails:
            raise UserError("download failed")
        events.append("block")
    assert events == expected


def gloo_message(text):
    return RuntimeError(f"[../third_party/gloo/gloo/transport/tcp/pair.cc:561] {text} [127.0.0.1]:18630")


@pytest.mark.parametrize("exc, expected", [
    (gloo_message("Connection closed by peer"), True),
    (gloo_message("Read error [127.0.0.1]:53130: Connection reset by peer"), True),
    (caused(OSError("while saving"), gloo_message("Connection closed by peer")), True),
    (tdist.DistBackendError("NCCL communicator was aborted on rank 0"), True),
    (tdist.DistNetworkError("failed to recv, got 0 bytes"), True),
    (tdist.DistStoreError("Socket Timeout"), True),
    (RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB"), False),
    (ValueError("Connection closed by peer"), False),
    (UserError("checkpoint not found"), False),
])
def test_peer_failures_are_recognised(exc, expected):
    assert system.is_peer_failure(exc) is expected


def test_single_process_helpers_are_no_ops():
    assert system.per_rank(torch.tensor(2.5)) == [2.5]
    model = build_model("cnn3", TINY)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    system.broadcast_buffers(model)
    system.broadcast_tensors(list(model.parameters()))
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


# ---------------------------------------------------------------- two gloo processes

def divergence_scenario(rank: int) -> str | None:
    data = DeviceData.create(torch.zeros(64, 28, 28, dtype=torch.uint8), torch.zeros(64, dtype=torch.long), "cpu")
    rt = ComputeSettings(torch.device("cpu"), system.AmpPolicy(None, False), 0.5, 0.25, rank=rank, world_size=2)
    step = mock.Mock(teachers=None)  # a stand-in for TrainStep: the loss of rank 1 becomes NaN at its third step
    step.side_effect = lambda x, y, *_: (torch.tensor(math.nan if rank == 1 and step.call_count == 3 else 0.5),
                                         torch.zeros(len(y), 10))
    try:
        train_one_epoch(step, data, 1, rt, Config(augment="none", batch_size=4, seed=0), sync_every=2)
    except DivergenceError as exc:
        return str(exc)
    return None


def broadcast_scenario(rank: int) -> dict:
    torch.manual_seed(rank)  # different weights and statistics on each rank
    model = build_model("cnn3", TINY).to(memory_format=torch.channels_last)
    bn = model.features[1]
    bn.running_mean.fill_(rank + 1.0)
    bn.num_batches_tracked.fill_(10 * (rank + 1))
    ema = ModelEma(model, 0.9)
    weight_before = model.features[0].weight.detach().clone()
    system.broadcast_buffers(model)
    system.broadcast_tensors([*ema.module.parameters(), *ema.module.buffers()])  # an EMA copy DDP does not keep
    ema_sum = sum(float(t.double().sum()) for t in ema.module.state_dict().values())
    return {"running_mean": bn.running_mean.tolist(), "tracked": int(bn.num_batches_tracked),
            "weight_kept": torch.equal(model.features[0].weight, weight_before),
            "ema_same_on_every_rank": len(set(system.per_rank(torch.tensor(ema_sum)))) == 1,
            "ema_channels_last": ema.module.features[0].weight.is_contiguous(memory_format=torch.channels_last)}


def first_scenario(rank: int, folder: Path) -> bool:
    marker = folder / "downloaded"
    with system.main_process_first(system.DistInfo(rank, 2, rank, 2, launched=True)):
        if rank == 0:
            time.sleep(1.0)  # a slow download: rank 1 must not read before it is done
            marker.write_text("done")
        return marker.exists()


def gloo_worker(rank: int, folder: str) -> None:
    """One of two gloo processes: every scenario's result (or the traceback) as JSON. Then rank 1 is killed
    with SIGKILL, and rank 0 adds whether its next collective raised what is_peer_failure recognises."""
    folder = Path(folder)
    try:
        tdist.init_process_group("gloo", init_method=f"file://{folder / 'store'}", rank=rank, world_size=2)
        results = {"per_rank": system.per_rank(torch.tensor(math.inf if rank else 1.5)),
                   "divergence": divergence_scenario(rank), "broadcast": broadcast_scenario(rank),
                   "first": first_scenario(rank, folder)}
        system.barrier()
    except Exception:
        results = {"error": traceback.format_exc()}
    (folder / f"rank{rank}.json").write_text(json.dumps(results))
    if rank == 1:
        os.kill(os.getpid(), signal.SIGKILL)
    time.sleep(0.5)
    try:
        tdist.all_reduce(torch.ones(3))
        results["killed_peer"] = "nothing raised"
    except Exception as exc:
        results["killed_peer"] = "a peer failure" if system.is_peer_failure(exc) else f"{type(exc).__name__}: {exc}"
    (folder / "rank0.json").write_text(json.dumps(results))
    os._exit(0)  # past gloo's destructors: with the peer gone, one of its threads may abort the process at exit


@pytest.fixture(scope="module")
def gloo_results(tmp_path_factory):
    folder = tmp_path_factory.mktemp("gloo")
    spawn = multiprocessing.get_context("spawn")  # not mp.spawn: that kills the survivors when one dies
    procs = [spawn.Process(target=gloo_worker, args=(rank, str(folder))) for rank in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(120)
        p.kill()  # one still running: a hang (nothing happens to one that ended)
        p.join()
    results = [json.loads((folder / f"rank{r}.json").read_text()) for r in range(2)]
    for r in results:
        assert "error" not in r, r["error"]
    assert [p.exitcode for p in procs] == [0, -signal.SIGKILL]
    return results


GLOO_EXPECTED = {  # scenario: what each of the two ranks sees
    "per_rank": [1.5, math.inf],  # every rank learns every rank's value
    # both ranks raise at the same sync point, so none waits in a collective
    "divergence": "loss became nan in epoch 1 (step 4) on rank 1",
    # rank 0's BatchNorm statistics and EMA copy; broadcast_buffers leaves the weights to DDP
    "broadcast": {"running_mean": [1.0] * 4, "tracked": 10, "weight_kept": True, "ema_same_on_every_rank": True,
                  "ema_channels_last": True},
    "first": True,  # the other ranks read after local rank zero downloaded
}


@pytest.mark.slow
@pytest.mark.parametrize("scenario", GLOO_EXPECTED)
def test_two_gloo_processes(gloo_results, scenario):
    assert [r[scenario] for r in gloo_results] == [GLOO_EXPECTED[scenario]] * 2


@pytest.mark.slow
def test_a_killed_rank_is_recognised_as_a_peer_failure(gloo_results):
    assert gloo_results[0]["killed_peer"] == "a peer failure"


# ---------------------------------------------------------------- end to end with torchrun

@pytest.fixture(scope="module")
def dropout_free_checkpoint(tmp_path_factory, trained_checkpoint):
    ckpt = torch.load(trained_checkpoint, weights_only=True)
    ckpt["arch_kwargs"] = {**ckpt["arch_kwargs"], "dropout": 0.0}
    path = tmp_path_factory.mktemp("nodropout") / "model.pt"
    torch.save(ckpt, path)
    return path


@pytest.fixture(scope="module")
def runs(tmp_path_factory, small_data_dir, dropout_free_checkpoint) -> dict:
    """The same 2-epoch fine-tune by two processes of 32 images a step and by one of 64: name -> its folder."""
    folders = {}
    for name, launch, batch in (("ddp", torchrun, 32), ("single", lambda *a: run_script("finetune_gpu.py", *a), 64)):
        out = folders[name] = tmp_path_factory.mktemp(name)
        result = launch("--model-path", dropout_free_checkpoint, "--data-dir", small_data_dir, "--batch-size", batch,
                        "--output", out / "run" / "best.pt", "--logdir", out / "tb", *SMALL, "--epochs", "2", *SGD)
        assert result.returncode == 0, result.stderr[-2000:]
        assert name == "single" or result.stdout.count("done (") == 1  # rank 0 alone prints
    return folders


@pytest.mark.slow
def test_two_processes_write_one_checkpoint_and_one_run_that_test_model_passes(runs, small_data_dir):
    out = runs["ddp"]
    metrics = json.loads((out / "run" / "metrics.json").read_text())
    assert metrics["world_size"] == 2 and metrics["global_batch_size"] == 64
    assert sorted(p.name for p in (out / "run").iterdir() if not p.name.startswith(".")) == [
        "best.pt", "last.pt", "metrics.json"]
    assert len(list((out / "tb").iterdir())) == 1
    state = torch.load(out / "run" / "best.pt", weights_only=True)["model"]
    assert not any(k.startswith("module.") for k in state)  # the plain model: loads anywhere
    check = run_script("test_model.py", "--model-path", out / "run" / "best.pt", "--data-dir", small_data_dir)
    assert check.returncode == 0, check.stdout


@pytest.mark.slow
def test_ddp_matches_one_process_with_the_same_global_batch(runs, dropout_free_checkpoint):
    ddp, one = (torch.load(runs[name] / "run" / "last.pt", weights_only=True) for name in ("ddp", "single"))
    ddp_rows, one_rows = ({row["epoch"]: row for row in last["history"]} for last in (ddp, one))
    assert sorted(ddp_rows) == sorted(one_rows) == [0, 1, 2]
    assert one_rows[2]["val_loss"] < one_rows[0]["val_loss"]  # a fine-tune, not a divergence that amplifies noise
    for epoch in (1, 2):  # the same images per step in fp32: only the order of floating-point sums differs
        for key in ("train_loss", "val_loss", "lr"):
            assert ddp_rows[epoch][key] == pytest.approx(one_rows[epoch][key], rel=1e-4), (epoch, key)
    start = torch.load(dropout_free_checkpoint, weights_only=True)["model"]
    for key, value in one["model"].items():
        change = (value - start[key]).double().norm()  # what 32 SGD steps moved the tensor
        difference = (ddp["model"][key] - value).double()
        assert difference.norm() <= 5e-3 * change, key  # (measured: at most 5e-6 of the change)
        assert difference.abs().max() < 3e-4, key  # (measured: at most 1e-7)


@pytest.mark.slow
@pytest.mark.parametrize("run, nproc, steps", [("ddp", None, 1024 // 32), ("ddp", 1, 1024 // 32),
                                               ("single", 2, 1024 // 2 // 64)],
                         ids=["two-in-a-plain-process", "two-in-torchrun's-one", "one-in-two"])
def test_a_resume_with_another_number_of_processes_continues_the_lr_schedule(runs, tmp_path, run, nproc, steps):
    """steps: per epoch of the resumed run (one process of 32 images per step; two of 64). nproc: torchrun's,
    which runs distributed even with one process."""
    shutil.copytree(runs[run] / "run", tmp_path / "run")
    args = ("--resume", tmp_path / "run" / "last.pt", "--epochs", 4, "--output", tmp_path / "run" / "best.pt", "--quiet")
    resumed = torchrun(*args, nproc=nproc, env={"TORCH_CPP_LOG_LEVEL": "INFO"}) if nproc else run_script(
        "finetune_gpu.py", *args)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert ("Reducer" in resumed.stderr) == bool(nproc)  # c10d's log: DDP was built, so the process group was too
    last = torch.load(tmp_path / "run" / "last.pt", weights_only=True)
    assert last["world_size"] == (nproc or 1)
    cfg = Config(epochs=4, **{key: last["config"][key] for key in ("lr", "min_lr", "scheduler", "warmup_epochs")})
    schedule = lr_multiplier(cfg, steps)  # the run's schedule, stretched to 4 epochs
    rows = {row["epoch"]: row for row in last["history"]}
    for epoch in (3, 4):
        assert rows[epoch]["lr"] == pytest.approx(cfg.lr * schedule((epoch - 1) * steps), rel=1e-6)


def worker_pid(launcher_pid: int, rank: int) -> int:
    """The pid of the torchrun worker with RANK=rank among the launcher's children."""
    for proc in Path("/proc").glob("[0-9]*"):
        with contextlib.suppress(OSError, IndexError, ValueError):
            ppid = int((proc / "stat").read_text().rsplit(")", 1)[1].split()[1])
            if ppid == launcher_pid and f"RANK={rank}".encode() in (proc / "environ").read_bytes().split(b"\0"):
                return int(proc.name)
    raise AssertionError(f"rank {rank} not found")


@pytest.mark.slow
def test_a_rank_killed_mid_run_gives_the_resume_command(tmp_path, small_data_dir, dropout_free_checkpoint):
    run = tmp_path / "run"
    launcher = subprocess.Popen(torchrun_command(
        "--model-path", dropout_free_checkpoint, "--data-dir", small_data_dir, "--batch-size", 32, "--output",
        run / "best.pt", "--logdir", tmp_path / "tb", *SMALL, "--epochs", "50"), cwd=REPO, stdout=subprocess.PIPE,
        stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 180
        while not (run / "last.pt").exists() and launcher.poll() is None and time.monotonic() < deadline:
            time.sleep(0.2)
        os.kill(worker_pid(launcher.pid, 1), signal.SIGKILL)
        _, stderr = launcher.communicate(timeout=120)
    finally:
        launcher.kill()  # nothing happens if it ended
        launcher.wait()
    assert launcher.returncode != 0
    assert f"resume with: python finetune_gpu.py --resume {run / 'last.pt'}" in stderr, stderr[-3000:]


@pytest.mark.slow
def test_a_failing_rank_fails_the_job_with_its_message(tmp_path, small_data_dir):
    result = torchrun("--model-path", tmp_path / "missing.pt", "--data-dir", small_data_dir,
                      "--batch-size", 32, "--output", tmp_path / "o" / "best.pt", *SMALL, "--epochs", "2")
    assert result.returncode != 0
    assert "checkpoint not found" in result.stderr and "rank 1" in result.stderr


@pytest.mark.slow
def test_two_processes_distil_into_the_resnet_preset(tmp_path, small_data_dir, trained_checkpoint):
    """BatchNorm in every block, strong augmentation, and a teacher that every rank runs on its own batches (new
    targets every step): rank 0 saves the plain model and records the run as one process does."""
    result = torchrun("--preset", "resnet20", "--arch-kwargs", json.dumps(TINY_RESNET), "--teacher", trained_checkpoint,
                      "--epochs", 1, "--batch-size", 32, "--limit-train", 1024, "--val-size", 500, "--device", "cpu",
                      "--quiet", "--data-dir", small_data_dir, "--output", tmp_path / "run" / "best.pt", "--logdir",
                      tmp_path / "tb", env={"OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stderr[-3000:]
    best, last = (torch.load(tmp_path / "run" / name, weights_only=True) for name in ("best.pt", "last.pt"))
    assert (best["arch"], best["arch_kwargs"]) == ("resnet", TINY_RESNET)
    assert not any(k.startswith("module.") for k in best["model"])
    assert last["world_size"] == 2 and last["teachers"][0]["path"] == str(trained_checkpoint)
    assert last["history"][-1]["epoch"] == 1

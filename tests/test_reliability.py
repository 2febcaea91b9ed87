"""Resume exactly, survive signals, kill -9 and divergence, guard the user's files."""

import json
import os
import random
import shutil
import signal
import subprocess
import sys
import textwrap
import time

import pytest
import torch
from conftest import REPO, SMALL_RUN, run_script

import finetune_gpu
from fashion_ft import engine
from fashion_ft.checkpoint import save_checkpoint

SMALL = ("--limit-train", "1024", *SMALL_RUN)
pytestmark = pytest.mark.slow  # each test runs or kills real processes


def args_for(data_dir, model_path, out, *extra):
    return ["--model-path", model_path, "--data-dir", data_dir, "--output", out / "best.pt",
            "--logdir", out.parent / "tb", *SMALL, *extra]


def weights(path):
    return torch.load(path, map_location="cpu", weights_only=True)["model"]


def same_weights(a, b) -> bool:
    wa, wb = weights(a), weights(b)
    return wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)


def metrics(out):
    m = json.loads((out / "metrics.json").read_text())
    return m["best_epoch"], m["best_val_acc"], m["test_acc"], m["test_loss"]


def start_and_signal(argv, after_line: str, signum):
    """Start finetune_gpu.py, send `signum` once a stdout line starts with `after_line`.

    The process is stopped (SIGSTOP) while the signal is queued, so that it lands where the process was
    when the line was read, however loaded the machine is."""
    proc = subprocess.Popen([sys.executable, str(REPO / "finetune_gpu.py"), *map(str, argv)], cwd=REPO,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONUNBUFFERED": "1"})
    for line in proc.stdout:
        if line.startswith(after_line):
            proc.send_signal(signal.SIGSTOP)
            proc.send_signal(signum)
            proc.send_signal(signal.SIGCONT)
            sent = time.monotonic()
            break
    stdout, stderr = proc.communicate(timeout=60)
    return proc.returncode, stderr, time.monotonic() - sent


def test_interrupted_and_resumed_equals_uninterrupted(tmp_path, small_data_dir, trained_checkpoint):
    straight = tmp_path / "straight"
    assert run_script("finetune_gpu.py", *args_for(small_data_dir, trained_checkpoint, straight,
                                                   "--epochs", 4)).returncode == 0
    broken = tmp_path / "broken"
    argv = [a for a in args_for(small_data_dir, trained_checkpoint, broken, "--epochs", 4) if a != "--quiet"]
    code, stderr, _ = start_and_signal(argv, "epoch   2", signal.SIGINT)
    assert code == 130, stderr
    assert "resume with: python finetune_gpu.py --resume" in stderr
    resumed = run_script("finetune_gpu.py", "--resume", broken / "last.pt", "--quiet")
    assert resumed.returncode == 0, resumed.stderr
    assert same_weights(straight / "best.pt", broken / "best.pt")
    assert same_weights(straight / "last.pt", broken / "last.pt")
    assert metrics(straight) == metrics(broken)


def test_resume_with_more_epochs_extends_a_constant_lr_run(tmp_path, small_data_dir, trained_checkpoint):
    """With a moving average, which must go on from where it stopped (the weights alone: the test above)."""
    straight, extended = tmp_path / "straight", tmp_path / "extended"
    common = ("--scheduler", "none", "--ema-decay", "0.9")
    assert run_script("finetune_gpu.py", *args_for(small_data_dir, trained_checkpoint, straight, *common,
                                                   "--epochs", 4)).returncode == 0
    assert run_script("finetune_gpu.py", *args_for(small_data_dir, trained_checkpoint, extended, *common,
                                                   "--epochs", 2)).returncode == 0
    more = run_script("finetune_gpu.py", "--resume", extended / "last.pt", "--epochs", 4, "--quiet")
    assert more.returncode == 0, more.stderr
    assert same_weights(straight / "last.pt", extended / "last.pt")
    assert same_weights(straight / "best.pt", extended / "best.pt")
    assert metrics(straight) == metrics(extended)
    ema = [torch.load(out / "last.pt", weights_only=True)["ema"] for out in (straight, extended)]
    assert all(torch.equal(ema[0][k], ema[1][k]) for k in ema[0])


def test_resume_refuses_changed_hyperparameters_unless_overridden(tmp_path, small_data_dir, trained_checkpoint):
    out = tmp_path / "run"
    assert run_script("finetune_gpu.py", *args_for(small_data_dir, trained_checkpoint, out, "--epochs", 1,
                                                   "--scheduler", "none", "--warmup-epochs", 0)).returncode == 0
    before = (out / "last.pt").read_bytes()
    refused = run_script("finetune_gpu.py", "--resume", out / "last.pt", "--epochs", 2, "--lr", 0.01)
    assert refused.returncode == 2 and "--lr 0.001 -> 0.01" in refused.stderr
    never = run_script("finetune_gpu.py", "--resume", out / "last.pt", "--epochs", 2, "--optimizer", "sgd",
                       "--override-resume")
    assert never.returncode == 2 and "--optimizer cannot change in a resumed run" in never.stderr
    assert (out / "last.pt").read_bytes() == before
    allowed = run_script("finetune_gpu.py", "--resume", out / "last.pt", "--epochs", 2, "--lr", 0.01,
                         "--weight-decay", 0.1, "--override-resume", "--quiet")
    assert allowed.returncode == 0, allowed.stderr
    last = torch.load(out / "last.pt", weights_only=True)
    assert [row["lr"] for row in last["history"][1:]] == pytest.approx([0.001, 0.01])  # the new LR is used
    assert last["optimizer"]["param_groups"][0]["weight_decay"] == 0.1


def test_resume_needs_neither_the_input_model_nor_from_scratch_flags(tmp_path, small_data_dir, trained_checkpoint):
    shutil.copy(trained_checkpoint, tmp_path / "input.pt")
    out = tmp_path / "run"
    assert run_script("finetune_gpu.py", *args_for(small_data_dir, tmp_path / "input.pt", out,
                                                   "--epochs", 1)).returncode == 0
    (tmp_path / "input.pt").unlink()  # moved away since: last.pt alone must do
    resumed = run_script("finetune_gpu.py", "--resume", out / "last.pt", "--epochs", 2, "--quiet")
    assert resumed.returncode == 0, resumed.stderr
    scratch = tmp_path / "scratch"
    made = run_script("finetune_gpu.py", "--from-scratch", "--data-dir", small_data_dir, "--output",
                      scratch / "best.pt", "--logdir", tmp_path / "tb", *SMALL, "--epochs", 1)
    assert made.returncode == 0, made.stderr
    resumed = run_script("finetune_gpu.py", "--resume", scratch / "last.pt", "--epochs", 2, "--quiet")
    assert resumed.returncode == 0, resumed.stderr


@pytest.mark.parametrize("signum, code", [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_signal_saves_and_exits_quickly(tmp_path, small_data_dir, trained_checkpoint, signum, code):
    out = tmp_path / "run"
    argv = [a for a in args_for(small_data_dir, trained_checkpoint, out, "--epochs", 50) if a != "--quiet"]
    exit_code, stderr, seconds = start_and_signal(argv, "epoch   1", signum)
    assert exit_code == code, stderr
    assert seconds < 30  # the flag is polled within an epoch of 16 steps, even on a loaded machine
    assert "Traceback" not in stderr and f"--resume {out / 'last.pt'}" in stderr
    last = torch.load(out / "last.pt", weights_only=True)
    assert last["epoch"] >= 1
    assert weights(out / "best.pt")  # intact and loadable
    assert not [p for p in out.iterdir() if p.name.endswith(".tmp")]


@pytest.mark.parametrize("after_line", ["data:", "epoch   0", "epoch   2"],
                         ids=["during set-up", "during the first epoch", "during the final test"])
def test_sigterm_anywhere_in_the_run_is_one_line_and_exit_143(tmp_path, small_data_dir, trained_checkpoint,
                                                              after_line):
    out = tmp_path / "run"
    argv = [a for a in args_for(small_data_dir, trained_checkpoint, out, "--epochs", 2) if a != "--quiet"]
    code, stderr, _ = start_and_signal(argv, after_line, signal.SIGTERM)
    assert code == 143, stderr
    assert "Traceback" not in stderr
    assert stderr.strip().splitlines()[-1].startswith("interrupted (SIGTERM): ")
    if (out / "last.pt").exists():
        assert f"--resume {out / 'last.pt'}" in stderr
        unfinished = json.loads((out / "metrics.json").read_text())
        assert unfinished["finished"] is False and unfinished["device"] == "cpu" and "stop_reason" not in unfinished
    else:
        assert "nothing to resume" in stderr and not (out / "metrics.json").exists()
    assert not (out / ".lock").exists()


def test_a_lost_console_does_not_stop_the_run(tmp_path, small_data_dir, trained_checkpoint):
    out = tmp_path / "run"
    argv = [str(a) for a in args_for(small_data_dir, trained_checkpoint, out, "--epochs", 2) if a != "--quiet"]
    command = " ".join([sys.executable, str(REPO / "finetune_gpu.py"), *argv])
    result = subprocess.run(["bash", "-c", f"{command} 2>{tmp_path / 'err'} | head -1; echo ${{PIPESTATUS[0]}}"],
                            capture_output=True, text=True, cwd=REPO, timeout=300)
    assert result.stdout.strip().splitlines()[-1] == "0", (tmp_path / "err").read_text()
    assert json.loads((out / "metrics.json").read_text())["finished"] is True
    assert "Traceback" not in (tmp_path / "err").read_text()


KILL_WRITER = textwrap.dedent("""
    import sys, torch
    from fashion_ft.checkpoint import save_checkpoint
    versions = [torch.full((300_000,), float(v)) for v in range(2)]
    i = 0
    while True:
        save_checkpoint({"version": i % 2, "w": versions[i % 2]}, sys.argv[1])
        i += 1
""")


def test_kill_9_during_saves_leaves_a_complete_file(tmp_path):
    target = tmp_path / "ckpt.pt"
    save_checkpoint({"version": 0, "w": torch.zeros(300_000)}, target)
    rng = random.Random(0)
    for _ in range(6):
        proc = subprocess.Popen([sys.executable, "-c", KILL_WRITER, str(target)], cwd=REPO)
        time.sleep(2.0 + rng.random())  # import torch, then some hundreds of saves
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        ckpt = torch.load(target, weights_only=True)
        assert torch.all(ckpt["w"] == ckpt["version"])  # old or new, never a mix or a torn file


def fail_after(calls: int, monkeypatch):
    """Make the training step's loss NaN from the `calls`-th step on (a diverging run)."""
    original = engine.TrainStep.__call__
    count = {"n": 0}

    def step(self, x, y, rt, targets=None):
        count["n"] += 1
        loss, logits = original(self, x, y, rt, targets)
        return (loss * float("nan"), logits) if count["n"] >= calls else (loss, logits)

    monkeypatch.setattr(engine.TrainStep, "__call__", step)


def test_nan_loss_stops_with_exit_1_and_keeps_the_best_model(tmp_path, small_data_dir, trained_checkpoint,
                                                            monkeypatch, capsys):
    out = tmp_path / "run"
    fail_after(20, monkeypatch)  # 1024 images / 64 = 16 steps per epoch: epoch 2 diverges
    code = finetune_gpu.main([str(a) for a in args_for(small_data_dir, trained_checkpoint, out, "--epochs", 5)])
    err = capsys.readouterr().err
    assert code == 1
    assert "loss became nan in epoch 2" in err and f"stays in {out / 'best.pt'}" in err
    assert torch.load(out / "best.pt", weights_only=True)["metrics"]["epoch"] in (0, 1)
    assert not [p for p in out.iterdir() if p.name.endswith(".tmp")]


def test_a_permission_never_travels_in_last_pt(tmp_path, small_data_dir, trained_checkpoint):
    """--overwrite given to run a is no licence for resuming a into run b's folder."""
    a, b = tmp_path / "a", tmp_path / "b"
    for out, extra in ((a, ["--overwrite"]), (b, [])):
        made = run_script("finetune_gpu.py", *args_for(small_data_dir, trained_checkpoint, out, "--epochs", 1,
                                                       "--limit-train", 256, *extra))
        assert made.returncode == 0, made.stderr
    before = {p.name: p.read_bytes() for p in b.iterdir() if p.is_file()}
    resumed = run_script("finetune_gpu.py", "--resume", a / "last.pt", "--output", b / "best.pt", "--epochs", 2)
    assert resumed.returncode == 2, resumed.stderr
    assert "already exists" in resumed.stderr and "--overwrite" in resumed.stderr
    assert {p.name: p.read_bytes() for p in b.iterdir() if p.is_file()} == before


def damaged_state(ckpt, fn):
    ckpt["optimizer"]["state"][0]["momentum_buffer"] = fn(ckpt["optimizer"]["state"][0]["momentum_buffer"])


DAMAGED_LAST = {  # name: (how to damage last.pt, exit code, what the one line says)
    "optimizer tensor of another shape": (lambda c: damaged_state(c, lambda t: torch.zeros(3)), 1,
                                          "optimizer state 'momentum_buffer' has shape (3,)"),
    "optimizer tensor expanded (stride 0)": (lambda c: damaged_state(c, lambda t: torch.zeros(1).expand(t.shape)), 0, ""),
    "batch size as text": (lambda c: c["config"].update(batch_size="256"), 1, "--batch-size: must be int"),
    "select a test metric": (lambda c: c["config"].update(select="test_acc"), 1, "--select: must be one of"),
}


@pytest.mark.parametrize("case", list(DAMAGED_LAST))
def test_a_damaged_last_pt_fails_at_start_naming_the_file(tmp_path, small_data_dir, trained_checkpoint, capsys, case):
    damage, code, text = DAMAGED_LAST[case]
    ckpt = torch.load(trained_checkpoint.parent / "last.pt", weights_only=True)
    damage(ckpt)
    save_checkpoint(ckpt, tmp_path / "last.pt")
    argv = ["--resume", tmp_path / "last.pt", "--output", tmp_path / "model.pt", "--logdir", tmp_path / "tb",
            "--data-dir", small_data_dir, "--epochs", 3, "--quiet"]
    assert finetune_gpu.main([str(a) for a in argv]) == code
    err = capsys.readouterr().err
    assert text in err and "Traceback" not in err
    if code:
        assert err.strip().splitlines() == [next(line for line in err.splitlines() if text in line)]
        assert str(tmp_path / "last.pt") in err


def test_a_failed_last_pt_write_never_reads_as_a_finished_run(tmp_path, small_data_dir, trained_checkpoint,
                                                              monkeypatch, capsys):
    """The final epoch's last.pt cannot be written (a full disk, say): exit 1, and metrics.json does not say
    the run finished."""
    from fashion_ft import trainer
    from fashion_ft.errors import UserError

    original = trainer.save_checkpoint

    def save(obj, path):
        if obj.get("kind") == "last" and obj["epoch"] == 2:
            raise UserError(f"no space left on device while writing {path}")
        original(obj, path)

    monkeypatch.setattr(trainer, "save_checkpoint", save)
    out = tmp_path / "run"
    assert finetune_gpu.main([str(a) for a in args_for(small_data_dir, trained_checkpoint, out, "--epochs", 2)]) == 1
    assert "no space left" in capsys.readouterr().err
    assert json.loads((out / "metrics.json").read_text())["finished"] is False


def test_a_resumed_run_never_replaces_its_original_input(tmp_path, small_data_dir, trained_checkpoint, capsys):
    """The --model-path recorded in last.pt stays an input on --resume, whether an --output would replace it
    as the best model or as the plain state_dict written beside it, --overwrite or not."""
    source = tmp_path / "in" / "x.state_dict.pt"  # a bare state_dict: the run writes one beside its best model
    source.parent.mkdir()
    torch.save(weights(trained_checkpoint), source)
    out = tmp_path / "run"
    assert finetune_gpu.main([str(a) for a in args_for(small_data_dir, source, out, "--epochs", 1)]) == 0
    before = source.read_bytes()
    for output in (source, source.parent / "x.pt"):  # the best model; the plain state_dict beside x.pt
        argv = ["--resume", out / "last.pt", "--output", output, "--overwrite", "--epochs", 2, "--logdir", tmp_path / "tb"]
        assert finetune_gpu.main([str(a) for a in argv]) == 2
        assert "is the --model-path input" in capsys.readouterr().err
    assert source.read_bytes() == before

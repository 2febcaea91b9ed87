"""Resume exactly; survive signals wherever they land, kill -9, a lost console and divergence; guard the
user's files."""

import itertools
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
from conftest import REPO, SMALL_RUN, load, run_script

import finetune_gpu
from fashion_ft import engine, system, trainer
from fashion_ft.checkpoint import save_checkpoint
from fashion_ft.errors import UserError

SMALL = ("--limit-train", "1024", *(a for a in SMALL_RUN if a != "--quiet"))  # loud: the tests wait for its lines
pytestmark = pytest.mark.slow  # each test runs or kills real processes


def args_for(data_dir, model_path, out, *extra) -> list[str]:
    return [str(a) for a in ("--model-path", model_path, "--data-dir", data_dir, "--output", out / "best.pt",
                             "--logdir", out.parent / "tb", *SMALL, *extra)]


def same_tensors(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def metrics(out):
    m = json.loads((out / "metrics.json").read_text())
    return m["best_epoch"], m["best_val_acc"], m["test_acc"], m["test_loss"]


def interrupt(argv, signum, after: float | str) -> tuple[int, str, str, float]:
    """Run python with `argv` and send it `signum` `after` seconds, or once a stdout line starts with `after`.
    The process is stopped (SIGSTOP) while the signal is queued, so that it lands where the process was when
    the line was read, however loaded the machine is. Returns the exit code, the stdout after that line,
    stderr and the seconds from the signal to the exit."""
    proc = subprocess.Popen([sys.executable, *map(str, argv)], cwd=REPO, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    if isinstance(after, float):
        time.sleep(after)
    else:
        next((line for line in proc.stdout if line.startswith(after)), None)
    proc.send_signal(signal.SIGSTOP)
    proc.send_signal(signum)
    proc.send_signal(signal.SIGCONT)
    sent = time.monotonic()
    stdout, stderr = proc.communicate(timeout=120)
    return proc.returncode, stdout, stderr, time.monotonic() - sent


def test_interrupted_and_resumed_equals_uninterrupted(tmp_path, small_data_dir, trained_checkpoint):
    """With a moving average, which goes on from where it stopped; the input model moved away since: last.pt
    alone must do."""
    shutil.copy(trained_checkpoint, tmp_path / "input.pt")
    straight, broken = tmp_path / "straight", tmp_path / "broken"
    run = ("--epochs", 4, "--ema-decay", 0.9)
    assert run_script("finetune_gpu.py", *args_for(small_data_dir, trained_checkpoint, straight, *run)).returncode == 0
    code, _, stderr, _ = interrupt([REPO / "finetune_gpu.py", *args_for(small_data_dir, tmp_path / "input.pt",
                                                                        broken, *run)], signal.SIGINT, "epoch   1")
    assert code == 130, stderr
    assert f"resume with: python finetune_gpu.py --resume {broken / 'last.pt'}" in stderr
    (tmp_path / "input.pt").unlink()
    resumed = run_script("finetune_gpu.py", "--resume", broken / "last.pt", "--quiet")
    assert resumed.returncode == 0, resumed.stderr
    for name in ("best.pt", "last.pt"):
        assert same_tensors(load(straight / name)["model"], load(broken / name)["model"]), name
    assert same_tensors(*(load(out / "last.pt")["ema"] for out in (straight, broken)))
    assert metrics(straight) == metrics(broken)


SIGNALLED = {  # where the signal lands: (the script, after (seconds, or the line it printed), signal, exit code)
    # 0.3 s after start both scripts are still importing torch (it takes a second or more)
    "finetune_gpu.py importing torch, SIGTERM": ("finetune_gpu.py", 0.3, signal.SIGTERM, 143),
    "finetune_gpu.py importing torch, SIGINT": ("finetune_gpu.py", 0.3, signal.SIGINT, 130),
    "test_model.py importing torch": ("test_model.py", 0.3, signal.SIGINT, 130),
    "during set-up": ("finetune_gpu.py", "data:", signal.SIGTERM, 143),
    "during the first epoch": ("finetune_gpu.py", "epoch   0", signal.SIGTERM, 143),
    "during the second epoch, SIGINT": ("finetune_gpu.py", "epoch   1", signal.SIGINT, 130),
}


@pytest.mark.parametrize("case", SIGNALLED)
def test_a_signal_anywhere_is_one_line_its_exit_code_and_intact_files(tmp_path, small_data_dir, trained_checkpoint,
                                                                      case):
    script, after, signum, expected = SIGNALLED[case]
    out = tmp_path / "run"
    # Epochs to spare: an epoch here lasts a tenth of a second, and a late reader must not find the run over
    argv = args_for(small_data_dir, trained_checkpoint, out, "--epochs", 6) if script == "finetune_gpu.py" else [
        "--model-path", str(trained_checkpoint), "--data-dir", str(small_data_dir), "--device", "cpu"]
    code, stdout, stderr, seconds = interrupt([REPO / script, *argv], signum, after)
    assert code == expected, stdout + stderr
    assert "Traceback" not in stderr
    assert stderr.strip().splitlines()[-1].startswith(f"interrupted ({signum.name})")
    assert seconds < 30  # the flag is polled within an epoch of 16 steps, even on a loaded machine
    if isinstance(after, float):
        assert "epoch   1" not in stdout and not (out / "best.pt").exists()
    elif (out / "last.pt").exists():
        assert f"--resume {out / 'last.pt'}" in stderr
        assert load(out / "last.pt")["epoch"] >= int(after.split()[1])
        assert load(out / "best.pt")["model"]  # intact and loadable
        unfinished = json.loads((out / "metrics.json").read_text())
        assert unfinished["finished"] is False and unfinished["device"] == "cpu" and "stop_reason" not in unfinished
    else:
        assert after == "data:" and "nothing to resume" in stderr and not (out / "metrics.json").exists()
    assert not [p for p in out.glob("*") if p.name.endswith(".tmp") or p.name == ".lock"]


def test_a_signal_after_the_last_epoch_says_whether_the_run_had_finished(tmp_path, small_data_dir, trained_checkpoint):
    """It lands in the loop's last check or the final test (a tenth of a second), or, read late, at the exit."""
    out = tmp_path / "run"
    argv = [REPO / "finetune_gpu.py", *args_for(small_data_dir, trained_checkpoint, out, "--epochs", 2)]
    code, _, stderr, _ = interrupt(argv, signal.SIGTERM, "epoch   2")
    finished = json.loads((out / "metrics.json").read_text())["finished"]
    assert "Traceback" not in stderr and load(out / "best.pt")["model"] and load(out / "last.pt")["model"]
    assert code == 143 or (finished and code in (0, -signal.SIGTERM))  # after main(): Python's own handling
    told = f"the run had finished: {out / 'metrics.json'} holds" if finished else f"--resume {out / 'last.pt'}"
    assert code != 143 or told in stderr.strip().splitlines()[-1]


@pytest.mark.parametrize("where", ["polled", "printed"])
def test_a_signal_once_metrics_json_says_finished_says_so(where, tmp_path, small_data_dir, trained_checkpoint,
                                                          monkeypatch, capsys, handlers_kept):
    """While the loop checks its flag for the last time (a flag it never reads again: the run finishes), or as
    the summary is printed."""
    def late(*args):  # the loop's own check of the flag, after reading it; the summary: the signal comes now
        if where == "printed" or sys._getframe(1).f_code.co_name == "fine_tune":
            os.kill(os.getpid(), signal.SIGTERM)
        return original(*args)

    module, name = (system, "any_rank") if where == "polled" else (trainer, "summary_lines")
    original, out = getattr(module, name), tmp_path / "run"
    monkeypatch.setattr(module, name, late)
    assert finetune_gpu.main(args_for(small_data_dir, trained_checkpoint, out, "--epochs", 1)) == 143
    told = f"interrupted (SIGTERM): the run had finished: {out / 'metrics.json'} holds its results"
    assert capsys.readouterr().err.strip().splitlines() == [told]


def test_a_lost_console_does_not_stop_the_run(tmp_path, small_data_dir, trained_checkpoint):
    out = tmp_path / "run"
    command = " ".join([sys.executable, str(REPO / "finetune_gpu.py"),
                        *args_for(small_data_dir, trained_checkpoint, out, "--epochs", 2)])
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
    for _ in range(6):  # import torch, then some hundreds of saves
        assert interrupt(["-c", KILL_WRITER, target], signal.SIGKILL, 2.0 + rng.random())[0] == -signal.SIGKILL
        ckpt = load(target)
        assert torch.all(ckpt["w"] == ckpt["version"])  # old or new, never a mix or a torn file


def test_nan_loss_stops_with_exit_1_and_keeps_the_best_model(tmp_path, small_data_dir, trained_checkpoint,
                                                            monkeypatch, capsys):
    original, steps = engine.TrainStep.__call__, itertools.count(1)

    def diverging(self, *args):  # 1024 images / 64 = 16 steps per epoch: NaN from step 20 on, in epoch 2
        loss, logits = original(self, *args)
        return loss * (float("nan") if next(steps) >= 20 else 1.0), logits

    monkeypatch.setattr(engine.TrainStep, "__call__", diverging)
    out = tmp_path / "run"
    assert finetune_gpu.main(args_for(small_data_dir, trained_checkpoint, out, "--epochs", 5)) == 1
    err = capsys.readouterr().err
    assert "loss became nan in epoch 2" in err and f"stays in {out / 'best.pt'}" in err
    assert load(out / "best.pt")["metrics"]["epoch"] in (0, 1)
    assert not [p for p in out.iterdir() if p.name.endswith(".tmp")]


def test_a_resume_takes_no_licence_from_its_record(tmp_path, small_data_dir, trained_checkpoint, capsys):
    """--overwrite given to run a is no licence for resuming a into run b's folder; and the --model-path
    recorded in last.pt stays an input, whether an --output would replace it as the best model or as the
    plain state_dict written beside it, --overwrite or not."""
    source = tmp_path / "in" / "x.state_dict.pt"  # a bare state_dict: the run writes one beside its best model
    source.parent.mkdir()
    torch.save(load(trained_checkpoint)["model"], source)
    a, b = tmp_path / "a", tmp_path / "b"
    assert finetune_gpu.main(args_for(small_data_dir, source, a, "--epochs", 1, "--limit-train", 256,
                                      "--overwrite")) == 0
    shutil.copytree(a, b)
    before = {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()}
    for output, flags, refusal in ((b / "best.pt", [], "already exists; pass --overwrite"),
                                   (source, ["--overwrite"], "is the --model-path input"),  # the best model
                                   (source.parent / "x.pt", ["--overwrite"], "is the --model-path input")):
        argv = ["--resume", a / "last.pt", "--output", output, *flags, "--epochs", 2, "--logdir", tmp_path / "tb"]
        assert finetune_gpu.main([str(arg) for arg in argv]) == 2
        assert refusal in capsys.readouterr().err
    assert {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()} == before


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
    ckpt = load(trained_checkpoint.parent / "last.pt")
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
    original = trainer.save_checkpoint

    def save(obj, path):
        if obj.get("kind") == "last" and obj["epoch"] == 2:
            raise UserError(f"no space left on device while writing {path}")
        original(obj, path)

    monkeypatch.setattr(trainer, "save_checkpoint", save)
    out = tmp_path / "run"
    assert finetune_gpu.main(args_for(small_data_dir, trained_checkpoint, out, "--epochs", 2)) == 1
    assert "no space left" in capsys.readouterr().err
    assert json.loads((out / "metrics.json").read_text())["finished"] is False

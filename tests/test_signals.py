"""A signal is honoured wherever it lands: swallowed by a library, turned into a C++ error by torch.save,
during a checkpoint's load, or while torch is still being imported."""

import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest
import torch
from conftest import REPO

from fashion_ft import cli
from fashion_ft.checkpoint import load_checkpoint, save_checkpoint
from fashion_ft.errors import Interrupted, UserError
from fashion_ft.signals import SignalGuard


def signal_self(signum=signal.SIGTERM):
    os.kill(os.getpid(), signum)


def swallowed():
    try:
        signal_self()
    except BaseException:  # a library that eats everything
        pass
    return 0


def turned_into_runtime_error():
    try:
        signal_self()
    except BaseException as exc:  # what torch's C++ writer does with an exception in a Python callback
        raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos") from exc


def then_a_user_error():
    try:
        signal_self()
    except BaseException:
        pass
    raise UserError("cannot write result/last.pt: torch could not write the file")


@pytest.mark.parametrize("body", [swallowed, turned_into_runtime_error, then_a_user_error])
def test_any_end_after_a_signal_is_that_interrupt(body, capsys):
    with SignalGuard() as signals:
        assert cli.run(body, debug=False, signals=signals) == 143
    assert capsys.readouterr().err.strip() == "interrupted (SIGTERM)"


def test_a_signal_before_the_loop_stops_it_at_the_first_poll():
    with SignalGuard() as signals:
        swallowed()
        with signals.polled() as received:
            assert received == ["SIGTERM"]


class SignalsMidWrite:
    """The temporary file, whose third write receives SIGTERM, as a run does while torch.save writes."""

    def __init__(self, fh):
        self.fh, self.writes = fh, 0

    def write(self, data):
        self.writes += 1
        if self.writes == 3:
            signal_self()
        return self.fh.write(data)

    def __getattr__(self, name):
        return getattr(self.fh, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.fh.close()


def test_a_signal_inside_torch_save_stays_the_signal(tmp_path, monkeypatch):
    path = tmp_path / "last.pt"
    save_checkpoint({"old": torch.zeros(3)}, path)
    old = path.read_bytes()
    real_fdopen = os.fdopen
    monkeypatch.setattr(os, "fdopen", lambda fd, mode: SignalsMidWrite(real_fdopen(fd, mode)))
    with SignalGuard(), pytest.raises(Interrupted):
        save_checkpoint({str(i): torch.randn(1000) for i in range(20)}, path)
    assert path.read_bytes() == old and [p.name for p in tmp_path.iterdir()] == ["last.pt"]


def test_the_file_size_limit_is_named(tmp_path):
    script = textwrap.dedent(f"""
        import resource, sys, torch
        sys.path.insert(0, {str(REPO)!r})
        from fashion_ft.checkpoint import save_checkpoint
        from fashion_ft.errors import UserError
        resource.setrlimit(resource.RLIMIT_FSIZE, (100_000, 100_000))
        try:
            save_checkpoint({{"w": torch.zeros(100_000)}}, {str(tmp_path / "big.pt")!r})
        except UserError as exc:
            print(exc)
    """)
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert "file too large while writing" in result.stdout and "ulimit -f" in result.stdout, result
    assert list(tmp_path.iterdir()) == []


def test_a_signal_while_a_checkpoint_loads_stays_the_signal(tmp_path, monkeypatch):
    save_checkpoint({"w": torch.zeros(3)}, tmp_path / "c.pt")

    def interrupted_load(*args, **kwargs):
        raise Interrupted("SIGINT")

    monkeypatch.setattr(torch, "load", interrupted_load)
    with pytest.raises(Interrupted):
        load_checkpoint(tmp_path / "c.pt")


@pytest.mark.slow
@pytest.mark.parametrize("script, signum, code", [("finetune_gpu.py", signal.SIGTERM, 143),
                                                  ("finetune_gpu.py", signal.SIGINT, 130),
                                                  ("test_model.py", signal.SIGINT, 130)])
def test_a_signal_while_torch_is_imported(tmp_path, script, signum, code):
    """0.3 s after start both scripts are still importing torch (it takes a second or more)."""
    args = ["--output", tmp_path / "out" / "best.pt", "--logdir", tmp_path / "tb", "--epochs", 1] \
        if script == "finetune_gpu.py" else []
    proc = subprocess.Popen([sys.executable, str(REPO / script), *map(str, args)], cwd=tmp_path,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    time.sleep(0.3)
    proc.send_signal(signum)
    stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == code, stdout + stderr
    assert "Traceback" not in stderr and stderr.strip().splitlines()[-1].startswith("interrupted")
    assert "epoch   1" not in stdout and not (tmp_path / "out" / "best.pt").exists()

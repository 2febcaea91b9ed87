"""A signal is honoured wherever it lands: swallowed by a library, turned into a C++ error, held back until a
checkpoint's write is done, during a checkpoint's load, or while torch is still being imported; a hang-up
stops a run unless nohup ignored it; signals after the interrupt tear nothing."""

import contextlib
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time

import pytest
import torch
from conftest import REPO, WrappedFile

from fashion_ft import config
from fashion_ft.checkpoint import load_checkpoint, save_checkpoint
from fashion_ft.errors import HANDLED_SIGNALS, Interrupted, SignalGuard, UserError, deferred


@pytest.fixture(autouse=True)
def pytest_keeps_its_handlers():
    """A guard that received a signal leaves its quiet handler for the process's shutdown: pytest gets its own back."""
    handlers = {s: signal.getsignal(s) for s in HANDLED_SIGNALS}
    yield
    for s, handler in handlers.items():
        signal.signal(s, handler)


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
        assert config.run(body, debug=False, signals=signals) == 143
    assert capsys.readouterr().err.strip() == "interrupted (SIGTERM)"


def test_a_signal_before_the_loop_stops_it_at_the_first_poll():
    with SignalGuard() as signals:
        swallowed()
        with signals.polled() as received:
            assert received == ["SIGTERM"]


class SignalsMidWrite(WrappedFile):
    """The temporary file, whose third write (and fourth, with `signals=2`) receives SIGTERM, as a run does
    while torch.save writes."""

    def __init__(self, fh, signals=1):
        super().__init__(fh)
        self.writes, self.signals = 0, signals

    def write(self, data):
        self.writes += 1
        if 3 <= self.writes < 3 + self.signals:
            signal_self()
        return super().write(data)


@pytest.mark.parametrize("signals, polling, raised", [(1, False, True), (2, False, True), (1, True, False),
                                                      (2, True, True)])
def test_a_signal_inside_torch_save_waits_for_the_file(tmp_path, monkeypatch, signals, polling, raised):
    """Outside the loop the interrupt comes once the file is in place; inside it one signal stays a flag."""
    path = tmp_path / "last.pt"
    save_checkpoint({"old": torch.zeros(3)}, path)
    new = {str(i): torch.randn(1000) for i in range(20)}
    real_fdopen = os.fdopen
    monkeypatch.setattr(os, "fdopen", lambda fd, mode: SignalsMidWrite(real_fdopen(fd, mode), signals))
    with SignalGuard() as guard, guard.polled() if polling else contextlib.nullcontext():
        with pytest.raises(Interrupted) if raised else contextlib.nullcontext():
            save_checkpoint(new, path)
    assert set(guard.received) == {"SIGTERM"}
    assert torch.equal(torch.load(path, weights_only=True)["7"], new["7"])
    assert [p.name for p in tmp_path.iterdir()] == ["last.pt"]


def test_deferrals_nest_and_put_the_handlers_back():
    held = None
    with SignalGuard() as guard:
        handlers = {s: signal.getsignal(s) for s in HANDLED_SIGNALS}
        with pytest.raises(Interrupted):
            with deferred():
                with deferred():
                    signal_self()
                held = list(guard.received)  # the outer write is still going on
        assert {s: signal.getsignal(s) for s in HANDLED_SIGNALS} == handlers
    assert held == [] and guard.received == ["SIGTERM"]


def test_off_the_main_thread_deferred_does_nothing():
    failures = []

    def write():
        try:
            with deferred():
                pass
        except BaseException as exc:  # signal.signal raises ValueError off the main thread
            failures.append(exc)

    thread = threading.Thread(target=write)
    thread.start()
    thread.join()
    assert failures == []


@pytest.mark.parametrize("before, code", [(signal.SIG_DFL, 129), (signal.SIG_IGN, 0)], ids=["terminal", "nohup"])
def test_a_hangup_stops_the_run_unless_it_was_ignored(before, code, capsys):
    signal.signal(signal.SIGHUP, before)
    with SignalGuard() as signals:
        assert config.run(lambda: signal_self(signal.SIGHUP) or 0, debug=False, signals=signals) == code
    assert capsys.readouterr().err.strip() == ("interrupted (SIGHUP)" if code else "")
    if not code:
        assert signal.getsignal(signal.SIGHUP) is signal.SIG_IGN


def test_signals_after_the_interrupt_are_only_recorded():
    """The cleanup on the way out (the lock's release, the report) is not torn, nor is the shutdown."""
    with SignalGuard() as signals:
        with pytest.raises(Interrupted):
            signal_self()
        signal_self()
        signal_self(signal.SIGINT)
    signal_self(signal.SIGINT)
    assert signals.received == ["SIGTERM", "SIGTERM", "SIGINT", "SIGINT"]


def test_a_guard_without_a_signal_puts_the_handlers_back():
    handlers = {s: signal.getsignal(s) for s in HANDLED_SIGNALS}
    with SignalGuard():
        pass
    assert {s: signal.getsignal(s) for s in HANDLED_SIGNALS} == handlers


SHUTDOWN = textwrap.dedent(f"""
    import atexit, os, signal, sys, time
    sys.path.insert(0, {str(REPO)!r})
    from fashion_ft import config
    from fashion_ft.errors import SignalGuard
    signum = getattr(signal, sys.argv[1])
    atexit.register(lambda: (os.kill(os.getpid(), signum), time.sleep(0.05)))  # a second one as the process ends
    with SignalGuard() as signals:
        code = config.run(lambda: os.kill(os.getpid(), signum), debug=False, signals=signals)
    sys.exit(code)
""")


@pytest.mark.parametrize("name, code", [("SIGINT", 130), ("SIGTERM", 143)])
def test_a_second_signal_during_the_shutdown_changes_nothing(name, code):
    """Without torch: a fraction of a second."""
    result = subprocess.run([sys.executable, "-c", SHUTDOWN, name], capture_output=True, text=True, timeout=60)
    assert (result.returncode, result.stderr) == (code, f"interrupted ({name})\n")


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
    assert f"cannot write {tmp_path / 'big.pt'}: File too large" in result.stdout, result  # the errno, recovered
    assert result.stdout.count("\n") == 1, result
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

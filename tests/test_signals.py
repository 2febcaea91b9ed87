"""A signal is honoured wherever it lands in the process: swallowed by a library, turned into a C++ error, held
back until a checkpoint's write is done, or during a checkpoint's load; a hang-up stops a run unless nohup
ignored it; signals after the interrupt tear nothing. (Real runs that receive signals: test_reliability.)"""

import contextlib
import os
import signal
import subprocess
import sys
import textwrap
from concurrent.futures import ThreadPoolExecutor
from unittest import mock

import pytest
import torch
from conftest import REPO, WrappedFile, handlers

from fashion_ft import config
from fashion_ft.checkpoint import load_checkpoint, save_checkpoint
from fashion_ft.errors import Interrupted, SignalGuard, UserError, deferred

pytestmark = pytest.mark.usefixtures("handlers_kept")


def signal_self(signum=signal.SIGTERM):
    os.kill(os.getpid(), signum)


@pytest.mark.parametrize("end", [None, RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos"),
                                 UserError("cannot write result/last.pt: torch could not write the file")],
                         ids=["swallowed", "turned into a C++ error", "then a user error"])
def test_any_end_after_a_signal_is_that_interrupt(end, capsys):
    def body():
        try:
            signal_self()
        except BaseException as exc:  # a library that eats everything, or torch's C++ writer, which turns it
            if isinstance(end, RuntimeError):  # into a RuntimeError
                raise end from exc
        if end is not None:
            raise end
        return 0

    with SignalGuard() as signals:
        assert config.run(body, debug=False, signals=signals) == 143
    assert capsys.readouterr().err.strip() == "interrupted (SIGTERM)"


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
        inside = handlers()
        with pytest.raises(Interrupted):
            with deferred():
                with deferred():
                    signal_self()
                held = list(guard.received)  # the outer write is still going on
        assert handlers() == inside
    assert held == [] and guard.received == ["SIGTERM"]


def test_off_the_main_thread_deferred_does_nothing():
    def write():
        with deferred():  # signal.signal would raise ValueError off the main thread
            pass

    with ThreadPoolExecutor(1) as pool:
        pool.submit(write).result()  # raises what the thread raised


@pytest.mark.parametrize("before, code", [(signal.SIG_DFL, 129), (signal.SIG_IGN, 0)], ids=["terminal", "nohup"])
def test_a_hangup_stops_the_run_unless_it_was_ignored(before, code, capsys):
    signal.signal(signal.SIGHUP, before)
    handlers_before = handlers()
    with SignalGuard() as signals:
        assert config.run(lambda: signal_self(signal.SIGHUP) or 0, debug=False, signals=signals) == code
    assert capsys.readouterr().err.strip() == ("interrupted (SIGHUP)" if code else "")
    assert code or handlers() == handlers_before  # no signal came: every handler is put back (SIGHUP's SIG_IGN too)


def test_a_swallowed_signal_stops_the_loop_at_its_first_poll_and_later_ones_are_only_recorded():
    """The cleanup on the way out (the lock's release, the report) is not torn, nor is the shutdown."""
    with SignalGuard() as signals:
        with pytest.raises(Interrupted):
            signal_self()
        with signals.polled() as received:
            assert received == ["SIGTERM"]
        signal_self()
        signal_self(signal.SIGINT)
    signal_self(signal.SIGINT)
    assert signals.received == ["SIGTERM", "SIGTERM", "SIGINT", "SIGINT"]


def test_a_flag_the_loop_never_acted_on_leaves_the_next_signal_its_stop():
    """As when it comes during the loop's last poll: the run goes on to its final test, where Ctrl-C stops it."""
    with SignalGuard() as signals:
        with signals.polled():
            signal_self()
        with pytest.raises(Interrupted):
            signal_self(signal.SIGINT)
        signal_self()
    assert signals.received == ["SIGTERM", "SIGINT", "SIGTERM"]


@pytest.mark.parametrize("name, code", [("SIGINT", 130), ("SIGTERM", 143)])
def test_a_second_signal_during_the_shutdown_changes_nothing(name, code):
    """Without torch: a fraction of a second."""
    script = textwrap.dedent(f"""
        import atexit, os, signal, sys, time
        sys.path.insert(0, {str(REPO)!r})
        from fashion_ft import config
        from fashion_ft.errors import SignalGuard
        signum = signal.{name}
        atexit.register(lambda: (os.kill(os.getpid(), signum), time.sleep(0.05)))  # a second one as the process ends
        with SignalGuard() as signals:
            code = config.run(lambda: os.kill(os.getpid(), signum), debug=False, signals=signals)
        sys.exit(code)
    """)
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert (result.returncode, result.stderr) == (code, f"interrupted ({name})\n")


def test_a_signal_while_a_checkpoint_loads_stays_the_signal(tmp_path, monkeypatch):
    save_checkpoint({"w": torch.zeros(3)}, tmp_path / "c.pt")
    monkeypatch.setattr(torch, "load", mock.Mock(side_effect=Interrupted("SIGINT")))
    with pytest.raises(Interrupted):
        load_checkpoint(tmp_path / "c.pt")

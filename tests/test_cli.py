"""cli.run: every way a script can end is one line on stderr and the documented exit code."""

import subprocess
import sys
import warnings

import pytest
from conftest import REPO

from fashion_ft import cli
from fashion_ft.errors import Interrupted, UsageError, UserError


@pytest.fixture(autouse=True)
def keep_formatwarning(monkeypatch):
    monkeypatch.setattr(warnings, "formatwarning", warnings.formatwarning)  # restored after each test


def raising(exc):
    def body():
        raise exc
    return body


@pytest.mark.parametrize("exc, code, line", [
    (UserError("model.pt: truncated or corrupt"), 1, "error: model.pt: truncated or corrupt"),
    (UsageError("--lr: must be > 0"), 2, "error: --lr: must be > 0"),
    (Interrupted("SIGTERM", "resume with --resume result/last.pt"), 143,
     "interrupted (SIGTERM): resume with --resume result/last.pt"),
    (Interrupted("SIGINT"), 130, "interrupted (SIGINT)"),
    (KeyboardInterrupt(), 130, "interrupted"),
    (ValueError("bad value\nsecond line"), 1, "error: ValueError: bad value (rerun with --debug for the traceback)"),
], ids=["user", "usage", "sigterm", "sigint", "ctrl-c", "unexpected"])
def test_each_failure_is_one_line_and_its_exit_code(capsys, exc, code, line):
    assert cli.run(raising(exc), debug=False) == code
    out, err = capsys.readouterr()
    assert err == line + "\n" and out == ""


def test_body_exit_code_passes_through(capsys):
    assert cli.run(lambda: print("ok") or 0, debug=False) == 0
    assert cli.run(lambda: 1, debug=False) == 1
    assert capsys.readouterr() == ("ok\n", "")


@pytest.mark.parametrize("exc", [UserError("x"), ValueError("y")])
def test_debug_shows_the_traceback(exc):
    with pytest.raises(type(exc)):
        cli.run(raising(exc), debug=True)


def test_prefix_names_the_rank(capsys):
    assert cli.run(raising(UserError("disk full")), debug=False, prefix=lambda: "error (rank 1 of 2): ") == 1
    assert capsys.readouterr().err == "error (rank 1 of 2): disk full\n"


def test_warnings_are_one_line():
    assert cli.run(lambda: 0, debug=False) == 0
    assert warnings.formatwarning("no CUDA GPU found", UserWarning, "system.py", 52) == "warning: no CUDA GPU found\n"


def test_broken_pipe_that_is_not_stdout_is_an_error(capsys):
    # stdout is still read here: a BrokenPipeError from elsewhere (a socket, a child) must be reported
    assert cli.run(raising(BrokenPipeError(32, "Broken pipe")), debug=False) == 1
    assert "error: BrokenPipeError: " in capsys.readouterr().err


def run_with_stdout_closed(*argv):
    """Start a script whose reader has gone before it writes, as `script | head -0` would."""
    proc = subprocess.Popen([sys.executable, *argv], cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    proc.stdout.close()
    err = proc.stderr.read()
    return proc.wait(timeout=120), err


PRINTS_A_LOT = ("import sys; from fashion_ft import cli; "
                "sys.exit(cli.run(lambda: [print('x' * 80) for _ in range(10_000)] and 0, debug=False))")
PRINTS_AT_EXIT = "import sys; from fashion_ft import cli; sys.exit(cli.run(lambda: print('x') or 0, debug=False))"


@pytest.mark.parametrize("code", [PRINTS_A_LOT, PRINTS_AT_EXIT], ids=["while-writing", "final-flush"])
def test_vanished_reader_ends_quietly(code):
    returncode, err = run_with_stdout_closed("-c", code)
    assert (returncode, err) == (1, "")

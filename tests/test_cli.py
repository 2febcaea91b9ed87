"""config.run: every way a script can end is one line on stderr and the documented exit code."""

import os
import subprocess
import sys
import unicodedata
import warnings
from unittest import mock

import pytest
from conftest import REPO

from fashion_ft import config
from fashion_ft.errors import Interrupted, UsageError, UserError
from fashion_ft.trainer import Console


@pytest.fixture(autouse=True)
def keep_formatwarning(monkeypatch):
    monkeypatch.setattr(warnings, "formatwarning", warnings.formatwarning)  # restored after each test


@pytest.mark.parametrize("exc, code, line", [
    (UserError("model.pt: truncated or corrupt"), 1, "error: model.pt: truncated or corrupt"),
    (UsageError("--lr: must be > 0"), 2, "error: --lr: must be > 0"),
    (Interrupted("SIGTERM", "resume with --resume result/last.pt"), 143,
     "interrupted (SIGTERM): resume with --resume result/last.pt"),
    (Interrupted("SIGINT"), 130, "interrupted (SIGINT)"),
    (KeyboardInterrupt(), 130, "interrupted"),
    (ValueError("bad value\nsecond line"), 1, "error: ValueError: bad value (rerun with --debug for the traceback)"),
    (UsageError("--output out\n/x.pt: its folder is a file"), 2, "error: --output out\\n/x.pt: its folder is a file"),
    (Interrupted("SIGINT", "resume with --resume r\x1b[2J/last.pt"), 130,
     "interrupted (SIGINT): resume with --resume r\\x1b[2J/last.pt"),
    (ModuleNotFoundError("No module named 'yaml'", name="yaml"), 1,
     "error: ModuleNotFoundError: No module named 'yaml' (rerun with --debug for the traceback)"),
], ids=["user", "usage", "sigterm", "sigint", "ctrl-c", "unexpected", "newline in a path", "escape in a hint",
        "a module the project does not need"])
def test_each_failure_is_one_line_and_its_exit_code(capsys, exc, code, line):
    assert config.run(mock.Mock(side_effect=exc), debug=False) == code
    assert capsys.readouterr() == ("", line + "\n")


def test_a_hang_up_exits_129_though_the_terminal_is_gone(monkeypatch):
    """After SIGHUP the terminal has closed: writing the line fails with EIO, and the code must still be 129."""
    monkeypatch.setattr(sys, "stderr", mock.Mock(**{"write.side_effect": OSError(5, "Input/output error")}))
    assert config.run(mock.Mock(side_effect=Interrupted("SIGHUP", "resume with: ...")), debug=False) == 129


def test_body_exit_code_passes_through(capsys):
    assert (config.run(lambda: print("ok") or 0, debug=False), config.run(lambda: 1, debug=False)) == (0, 1)
    assert capsys.readouterr() == ("ok\n", "")


@pytest.mark.parametrize("exc", [UserError("x"), ValueError("y")])
def test_debug_shows_the_traceback(exc):
    with pytest.raises(type(exc)):
        config.run(mock.Mock(side_effect=exc), debug=True)


def test_prefix_names_the_rank(capsys):
    body = mock.Mock(side_effect=UserError("disk full"))
    assert config.run(body, debug=False, prefix=lambda: "error (rank 1 of 2): ") == 1
    assert capsys.readouterr().err == "error (rank 1 of 2): disk full\n"


def test_warnings_and_console_lines_are_one_line(capsys):
    assert config.run(lambda: 0, debug=False) == 0
    assert warnings.formatwarning("no CUDA GPU found", UserWarning, "system.py", 52) == "warning: no CUDA GPU found\n"
    assert warnings.formatwarning("logs\nx: read-only", UserWarning, "tblog.py", 76) == "warning: logs\\nx: read-only\n"
    console = Console(quiet=False, is_main=True)
    console.print("saved: out\nx/best.pt (best)")
    console.warn("logs\x1b[2J: read-only")
    assert capsys.readouterr() == ("saved: out\\nx/best.pt (best)\n", "warning: logs\\x1b[2J: read-only\n")


@pytest.mark.parametrize("text, shown", [
    ("result/a\nb.pt", "result/a\\nb.pt"), ("\x1b[31mred", "\\x1b[31mred"), ("a\rb\tc\x00", "a\\rb\\tc\\x00"),
    ("\x7f\x85", "\\x7f\\x85"), ("a\u2028b\u2029", "a\\u2028b\\u2029"), ("bad\udcff.pt", "bad\\udcff.pt"),
    ("结果/模型.pt", "结果/模型.pt"), ("café ñ", "café ñ"), ("", ""),
])
def test_printable_escapes_control_characters_only(text, shown):
    assert config.printable(text) == shown


def test_printable_escapes_exactly_the_control_categories():
    escaped = {c for c in map(chr, range(0x10000)) if config.printable(c) != c}
    assert escaped == {c for c in map(chr, range(0x10000)) if unicodedata.category(c) in ("Cc", "Cs", "Zl", "Zp")}
    astral = "".join(map(chr, range(0x10000, 0x110000, 7)))  # none of those categories lies beyond the BMP
    assert config.printable(astral) == astral


# ---------------------------------------------------------------- a Python without the project's packages

def test_required_packages_are_those_of_requirements_txt():
    lines = (REPO / "requirements.txt").read_text().splitlines()
    names = {line.split(">")[0].split("=")[0].strip() for line in lines if line.strip() and not line.startswith("#")}
    assert set(config.REQUIRED_PACKAGES) == names


@pytest.mark.parametrize("name", [*config.REQUIRED_PACKAGES, "torch._C"])
def test_a_missing_required_package_says_how_to_set_up(capsys, name):
    exc = ModuleNotFoundError(f"No module named {name!r}", name=name)
    assert config.run(mock.Mock(side_effect=exc), debug=False) == 1
    err = capsys.readouterr().err
    assert err.startswith(f"error: {name.split('.')[0]} is not installed in {sys.executable}") and err.count("\n") == 1
    assert "bash scripts/setup.sh" in err and "source .venv/bin/activate" in err and ".venv/bin/python" in err


@pytest.mark.parametrize("script", ["test_model.py", "finetune_gpu.py"])
def test_a_python_without_torch_gets_one_line(tmp_path, script):
    (tmp_path / "torch.py").write_text("raise ModuleNotFoundError(\"No module named 'torch'\", name='torch')\n")
    result = subprocess.run([sys.executable, script], cwd=REPO, capture_output=True, text=True, timeout=60,
                            env={**os.environ, "PYTHONPATH": str(tmp_path)})
    assert result.returncode == 1 and result.stdout == ""
    assert result.stderr == (f"error: torch is not installed in {sys.executable}, the Python running this script: "
                             f"set the project up with `bash scripts/setup.sh`, then `source .venv/bin/activate` "
                             f"(or run `.venv/bin/python {script} ...`)\n")


@pytest.mark.parametrize("body", ["[print('x' * 80) for _ in range(10_000)] and 0", "print('x') or 0"],
                         ids=["while-writing", "final-flush"])
def test_vanished_reader_ends_quietly(body):
    """`script | head -0`: the reader has gone before the script writes."""
    proc = subprocess.Popen([sys.executable, "-c", f"import sys; from fashion_ft import config; "
                             f"sys.exit(config.run(lambda: {body}, debug=False))"], cwd=REPO, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    proc.stdout.close()
    assert (proc.stderr.read(), proc.wait(timeout=120)) == ("", 1)

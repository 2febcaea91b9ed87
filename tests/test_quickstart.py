"""QUICKSTART.sh as a user runs it, in a copy of the project (it writes result/ and logs_finetune/)."""

import json
import os
import shlex
import shutil
import subprocess
import sys

import pytest
from conftest import REPO

import finetune_gpu
import test_model

PROJECT_FILES = ("QUICKSTART.sh", "finetune_gpu.py", "test_model.py", "requirements.txt", "scripts", "fashion_ft",
                 "model")


def copy_project(dest):
    for name in PROJECT_FILES:
        src = REPO / name
        if src.is_dir():
            shutil.copytree(src, dest / name, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy(src, dest / name)


def quickstart(cwd, *args, env_extra=None):
    """Run QUICKSTART.sh without its set-up; VIRTUAL_ENV makes it use the interpreter running the tests."""
    env = {k: v for k, v in os.environ.items() if k != "CONDA_PREFIX"}
    env.update({"QUICKSTART_SKIP_SETUP": "1", "VIRTUAL_ENV": sys.prefix, **(env_extra or {})})
    return subprocess.run(["bash", "QUICKSTART.sh", *args], cwd=cwd, capture_output=True, text=True,
                          timeout=300, env=env)


def test_help_and_bad_option(tmp_path):
    copy_project(tmp_path)
    shown = quickstart(tmp_path, "--help")
    assert shown.returncode == 0 and "--smoke" in shown.stdout
    bad = quickstart(tmp_path, "--bogus")
    assert bad.returncode == 2 and "unknown option --bogus" in bad.stderr


@pytest.mark.slow
def test_smoke_mode_runs_every_step(tmp_path, real_data_dir):
    copy_project(tmp_path)
    result = quickstart(tmp_path, "--smoke", env_extra={"FASHION_MNIST_DIR": str(real_data_dir)})
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    lines = result.stdout.splitlines()
    assert sum("checks passed" in line for line in lines) == 2  # base model, then the fine-tuned one
    assert not [line for line in lines if "FAIL" in line]
    assert "== step 3/3" in result.stdout and "    tensorboard --logdir logs_finetune" in result.stdout
    # the active environment is used as it is, so there is no .venv to activate
    assert "source .venv/bin/activate" not in result.stdout and f"python is {sys.prefix}/bin/python" in result.stdout
    assert (tmp_path / "result" / "smoke" / "mnist_cnn_finetuned.pt").is_file()
    assert (tmp_path / "logs_finetune" / "quickstart_smoke").is_dir()
    check_next_commands(tmp_path, result.stdout, real_data_dir)


def check_next_commands(cwd, stdout, data_dir):
    """Every printed next command parses; the resume one (one more epoch) runs as printed."""
    commands = [shlex.split(line.split("#")[0]) for line in stdout.split("Next:\n", 1)[1].splitlines() if line.strip()]
    assert len(commands) == 4 and all(c[0] == "python" for c in commands)
    for _, script, *args in commands:
        parser = finetune_gpu.get_args_parser() if script == "finetune_gpu.py" else test_model.get_args_parser()
        parser.parse_args(args)
    resume = next(c for c in commands if "--resume" in c)
    ran = subprocess.run([sys.executable, *resume[1:]], cwd=cwd, capture_output=True, text=True, timeout=300,
                         env={**os.environ, "FASHION_MNIST_DIR": str(data_dir)})
    assert ran.returncode == 0, ran.stderr[-3000:]
    assert json.loads((cwd / "result" / "smoke" / "metrics.json").read_text())["history"][-1]["epoch"] == 2


def test_stops_at_the_first_failure(tmp_path, real_data_dir):
    copy_project(tmp_path)
    (tmp_path / "model" / "mnist_cnn3.pt").write_bytes(b"not a checkpoint")
    result = quickstart(tmp_path, "--smoke", env_extra={"FASHION_MNIST_DIR": str(real_data_dir)})
    assert result.returncode == 1
    assert "step 'pre-flight check' failed" in result.stderr
    assert "== step 2/3" not in result.stdout and not (tmp_path / "result").exists()

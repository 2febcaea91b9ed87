"""scripts/setup.sh: which interpreter the project uses, and the project venv it makes (no torch installed)."""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import REPO

SETUP_ENV = ("VIRTUAL_ENV", "CONDA_PREFIX", "PYTHON")


def copy_setup(dest: Path) -> Path:
    (dest / "scripts").mkdir(parents=True)
    shutil.copy(REPO / "scripts" / "setup.sh", dest / "scripts" / "setup.sh")
    return dest


def setup(cwd: Path, *args, **env_extra) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in SETUP_ENV}
    env.update(env_extra)
    return subprocess.run(["bash", "scripts/setup.sh", *args], cwd=cwd, capture_output=True, text=True,
                          timeout=120, env=env)


def fake_env(folder: Path, status: int = 0) -> None:
    """A folder that looks like an environment: it has an executable bin/python (exiting with status)."""
    (folder / "bin").mkdir(parents=True)
    python = folder / "bin" / "python"
    python.write_text(f"#!/bin/sh\nexit {status}\n")
    python.chmod(0o755)


@pytest.mark.parametrize("env, code, python, error", [
    ({}, 0, "{project}/.venv/bin/python", ""),  # no active env: the project venv, not made by --print-python
    ({"VIRTUAL_ENV": "{tmp}/venv", "CONDA_PREFIX": "{tmp}/conda"}, 0, "{tmp}/venv/bin/python", ""),
    ({"CONDA_PREFIX": "{tmp}/conda"}, 0, "{tmp}/conda/bin/python", ""),
    ({"VIRTUAL_ENV": "{tmp}/gone"}, 1, "", "{tmp}/gone has no bin/python"),
])
def test_print_python_picks_the_active_venv_then_conda_then_the_project_venv(tmp_path, env, code, python, error):
    project = copy_setup(tmp_path / "p")
    for name in ("venv", "conda"):
        fake_env(tmp_path / name)
    names = {"tmp": tmp_path, "project": project}
    result = setup(project, "--print-python", **{k: v.format(**names) for k, v in env.items()})
    assert (result.returncode, result.stdout.strip()) == (code, python.format(**names)), result.stderr
    assert error.format(**names) in result.stderr and result.stderr.count("\n") == code  # a refusal is one line
    assert not (project / ".venv").exists()


def test_unknown_option_is_a_usage_error(tmp_path):
    result = setup(copy_setup(tmp_path / "p"), "--bogus")
    assert result.returncode == 2 and "unknown option --bogus" in result.stderr


def test_a_python_without_venv_support_gets_the_package_to_install(tmp_path):
    """Debian's python3 without python3-venv: venv imports, ensurepip does not."""
    project = copy_setup(tmp_path / "p")
    stub = tmp_path / "python3"
    stub.write_text(f'#!/bin/sh\ncase "$*" in *ensurepip*) exit 1 ;; esac\nexec "{sys.executable}" "$@"\n')
    stub.chmod(0o755)
    result = setup(project, PYTHON=str(stub))
    version = f"{sys.version_info[0]}.{sys.version_info[1]}"
    assert result.returncode == 1
    assert f"'sudo apt-get install python{version}-venv'" in result.stderr
    assert result.stderr.count("\n") == 1
    assert not (project / ".venv").exists()


def test_set_up_makes_a_venv_that_sees_the_system_packages_and_replaces_a_broken_one(tmp_path):
    project = copy_setup(tmp_path / "p")
    (project / "requirements.txt").write_text("pip\n")  # already in every new venv: nothing to download
    (project / "fashion_ft").mkdir()
    (project / "fashion_ft" / "__init__.py").write_text("")
    (project / "fashion_ft" / "data.py").write_text("def find_data_dir(path, split):\n    return '/stub/data'\n")
    fake_env(project / ".venv", status=1)  # a python without pip, as in a venv made without ensurepip
    base = getattr(sys, "_base_executable", sys.executable)  # a venv is made from the base interpreter

    first = setup(project, PYTHON=base)
    assert first.returncode == 0, first.stdout + first.stderr
    assert "== Virtual environment .venv" in first.stdout and "found in /stub/data" in first.stdout
    assert "include-system-site-packages = true" in (project / ".venv" / "pyvenv.cfg").read_text()
    prefix = subprocess.run([project / ".venv" / "bin" / "python", "-c", "import sys; print(sys.prefix)"],
                            capture_output=True, text=True, check=True).stdout.strip()
    assert Path(prefix) == project / ".venv"

    again = setup(project, PYTHON=base)
    assert again.returncode == 0 and "== Virtual environment" not in again.stdout  # reused

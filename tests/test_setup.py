"""scripts/setup.sh: which interpreter the project uses, and the project venv it makes (no torch installed)."""

import os
import shutil
import subprocess
import sys
from pathlib import Path

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


def fake_env(folder: Path, status: int = 0) -> Path:
    """A folder that looks like an environment: it has an executable bin/python (exiting with status)."""
    (folder / "bin").mkdir(parents=True)
    python = folder / "bin" / "python"
    python.write_text(f"#!/bin/sh\nexit {status}\n")
    python.chmod(0o755)
    return folder


def test_without_an_active_env_the_project_venv_is_chosen_and_nothing_is_made(tmp_path):
    project = copy_setup(tmp_path / "p")
    result = setup(project, "--print-python")
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == f"{project}/.venv/bin/python"
    assert not (project / ".venv").exists()


def test_an_active_venv_is_used_before_a_conda_env(tmp_path):
    project = copy_setup(tmp_path / "p")
    venv, conda = fake_env(tmp_path / "venv"), fake_env(tmp_path / "conda")
    assert setup(project, "--print-python", VIRTUAL_ENV=str(venv), CONDA_PREFIX=str(conda)).stdout.strip() \
        == f"{venv}/bin/python"
    assert setup(project, "--print-python", CONDA_PREFIX=str(conda)).stdout.strip() == f"{conda}/bin/python"


def test_an_active_env_without_python_is_refused_in_one_line(tmp_path):
    project = copy_setup(tmp_path / "p")
    result = setup(project, "--print-python", VIRTUAL_ENV=str(tmp_path / "gone"))
    assert result.returncode == 1 and result.stdout == ""
    assert result.stderr.count("\n") == 1 and f"{tmp_path / 'gone'} has no bin/python" in result.stderr


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

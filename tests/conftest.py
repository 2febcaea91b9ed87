"""Shared fixtures: a small real Fashion-MNIST subset, a way to run the real scripts, a trained checkpoint."""

import contextlib
import functools
import importlib
import io
import json
import os
import signal
import subprocess
import sys
import warnings
from pathlib import Path
from unittest import mock

import numpy as np
import pytest
import torch
from foreign import make_foreign

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from fashion_ft import system  # noqa: E402
from fashion_ft.data import FILES, IMAGES_MAGIC, LABELS_MAGIC, find_data_dir, read_split, write_idx  # noqa: E402, F401 (tests import read_split and write_idx from here)
from fashion_ft.errors import HANDLED_SIGNALS  # noqa: E402
from fashion_ft.model import build_model  # noqa: E402


def pytest_configure(config):
    """Under pytest-xdist the workers share the cores: each worker, and every script it runs, gets its share
    of threads, because OpenMP threads beyond the cores spin against each other."""
    workers = os.environ.get("PYTEST_XDIST_WORKER_COUNT")
    if workers:
        share = max(1, len(os.sched_getaffinity(0)) // int(workers))
        os.environ.setdefault("OMP_NUM_THREADS", str(share))
        torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))


def write_split(folder, split: str, images, labels) -> None:
    """Both IDX files of a split (uint8 images N x 28 x 28, labels N), in the layout read_split reads."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    image_stem, label_stem = FILES[split]
    write_idx(folder / image_stem, np.asarray(images), IMAGES_MAGIC)
    write_idx(folder / label_stem, np.asarray(labels), LABELS_MAGIC)


# The tiny networks of the unit tests: fast to build and train, real in every other way. A ResNet's first stage
# is 8 wide: from 4 channels, torch 2.14.1's channels_last backward of the 1x1 stride-2 shortcut crashes on CPU.
TINY = {"channels": [4, 8, 8], "hidden": 16}
TINY_RESNET = {"widths": [8, 8, 16], "blocks": 1, "num_classes": 10}


def tiny_model(arch: str = "cnn3", **kwargs):
    """A tiny network with seeded weights, in eval mode (`kwargs` override its TINY widths)."""
    torch.manual_seed(0)
    return build_model(arch, {**(TINY if arch == "cnn3" else TINY_RESNET), **kwargs}).eval()


def head_parameters(model) -> set[str]:
    """Names of the parameters that --freeze-conv leaves trainable: the head the forward's trace finds."""
    from fashion_ft.model import _head_tensors

    head = _head_tensors(model)
    return {name for name, p in model.named_parameters() if id(p) in head}


def load(path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=True)


def handlers() -> dict:
    return {s: signal.getsignal(s) for s in HANDLED_SIGNALS}


@pytest.fixture
def handlers_kept():
    """A guard that received a signal leaves its quiet handler for the process's end: pytest gets its own back."""
    before = handlers()
    yield
    for s, handler in before.items():
        signal.signal(s, handler)


def caused(outer: BaseException, inner: BaseException) -> BaseException:
    outer.__cause__ = inner
    return outer


class WrappedFile(io.BufferedWriter):
    """The file os.fdopen(fd, "wb") returns, taken over (detached) so that a test double can override write()."""

    def __init__(self, fh):
        super().__init__(fh.detach())


def run_script(script: str, *args, cwd=None, timeout=300, env=None) -> subprocess.CompletedProcess:
    """Run one of the real top-level scripts as a user would, capturing its output. Without `cwd` or
    `env`, the two scripts run in this process (their main(argv), the same code path after the
    interpreter's start), which spares each run the two seconds of importing torch."""
    if not (cwd or env) and script in ("finetune_gpu.py", "test_model.py"):
        return run_in_this_process(script, [str(a) for a in args])
    full_env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
    return subprocess.run(
        [sys.executable, str(REPO / script), *map(str, args)],
        cwd=cwd or REPO, capture_output=True, text=True, timeout=timeout, env=full_env,
    )


def run_in_this_process(script: str, argv: list[str]) -> subprocess.CompletedProcess:
    """main(argv) of a script with its output captured, and what a run may change in the process put back:
    the working folder, the environment, torch's threads and determinism, the warning filters."""
    module = importlib.import_module(script.removesuffix(".py"))
    out, err = io.StringIO(), io.StringIO()
    threads, deterministic = torch.get_num_threads(), torch.are_deterministic_algorithms_enabled()
    try:
        with (pytest.MonkeyPatch.context() as put_back, mock.patch.dict(os.environ), warnings.catch_warnings(),
              contextlib.redirect_stdout(out), contextlib.redirect_stderr(err)):
            put_back.chdir(REPO)
            put_back.setattr(warnings, "formatwarning", warnings.formatwarning)  # catch_warnings leaves it as set
            warnings.simplefilter("always")  # a warning seen by an earlier run of this worker is shown again
            code = module.main(argv)
    except SystemExit as exc:  # argparse
        code = exc.code if isinstance(exc.code, int) else 1
    finally:
        torch.set_num_threads(threads)
        torch.use_deterministic_algorithms(deterministic)
    return subprocess.CompletedProcess([script, *argv], code, out.getvalue(), err.getvalue())


@pytest.fixture(scope="session")
def real_data_dir() -> Path:
    """The full Fashion-MNIST (scripts/setup.sh installs it)."""
    return find_data_dir(None, "train")


@pytest.fixture(scope="session")
def small_data_dir(tmp_path_factory, real_data_dir) -> Path:
    """Real images, fewer of them: the first 3,000 training and 1,000 test images, uncompressed."""
    folder = tmp_path_factory.mktemp("fmnist_small")
    for split, n in (("train", 3000), ("test", 1000)):
        images, labels = read_split(real_data_dir, split)
        write_split(folder, split, images[:n].numpy(), labels[:n].numpy())
    return folder


# cnn3 at a third of its widths: about a ninth of the work, and as real a model (78% of the test images
# after trained_checkpoint's two epochs, as at full width).
SMALL_CNN3 = {"channels": [16, 32, 64], "hidden": 128}
# Flags for a fast, small fine-tuning run on small_data_dir.
SMALL_RUN = ("--val-size", "500", "--batch-size", "64", "--eval-batch-size", "500", "--quiet", "--device", "cpu")


@pytest.fixture(scope="session")
def trained_checkpoint(tmp_path_factory, small_data_dir) -> Path:
    """A real checkpoint made by finetune_gpu.py from scratch on the small subset (SMALL_CNN3, 2 epochs)."""
    out = tmp_path_factory.mktemp("trained")
    result = run_script(
        "finetune_gpu.py", "--from-scratch", "--arch-kwargs", json.dumps(SMALL_CNN3), "--optimizer", "sgd",
        "--lr", "0.05", "--augment", "none", "--epochs", "2", "--data-dir", small_data_dir, "--output",
        out / "model.pt", "--logdir", out / "tb", *SMALL_RUN,
    )
    assert result.returncode == 0, result.stderr
    return out / "model.pt"


@pytest.fixture
def broken_cuda(monkeypatch):
    """An NVIDIA GPU (/dev/nvidia0) whose driver is older than torch's CUDA: torch sees no GPU."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(system, "nvidia_gpu_evidence", lambda: "/dev/nvidia0")
    monkeypatch.setattr(torch.version, "cuda", "12.8")
    too_old = RuntimeError("The NVIDIA driver on your system is too old (found version 11040).\nPlease update")
    monkeypatch.setattr(torch.cuda, "init", mock.Mock(side_effect=too_old))


def finetune(tmp_path, data_dir, model_path, *args, name="run", limit_train=1024):
    """Run finetune_gpu.py on a small subset into tmp_path/name; returns (result, output folder)."""
    out = tmp_path / name
    result = run_script("finetune_gpu.py", "--model-path", model_path, "--data-dir", data_dir,
                        "--output", out / "best.pt", "--logdir", tmp_path / "tb", "--limit-train", limit_train,
                        *SMALL_RUN, *args)
    return result, out


@pytest.fixture(scope="session")
def small_splits(small_data_dir):
    """(train images, train labels, test images, test labels) of the small subset."""
    return (*read_split(small_data_dir, "train"), *read_split(small_data_dir, "test"))


@pytest.fixture(scope="session")
def foreign_nets(tmp_path_factory, small_splits):
    """name -> Foreign, each trained once per session, on first use."""

    @functools.cache
    def get(name):
        return make_foreign(name, tmp_path_factory.mktemp(f"foreign_{name}"), *small_splits)
    return get

"""test_model.py run as a user runs it: every bad input is exit 1, one clear line, no traceback, nothing
written; the happy path passes every check."""

import json
import os

import numpy as np
import pytest
import torch
from conftest import run_script, write_idx, write_split

from fashion_ft import preflight
from fashion_ft.checkpoint import make_checkpoint, save_checkpoint
from fashion_ft.data import FILES, LABELS_MAGIC
from fashion_ft.model import build_model

TINY = {"channels": [4, 8, 8], "hidden": 16}
QUICK = ("--device", "cpu", "--batches", "1", "--batch-size", "64")


class RunsCode:
    """Unpickling this runs a shell command: what a malicious checkpoint does."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def listing(folder):
    """Every file under folder with its size and mtime: any write shows up."""
    return sorted((str(p.relative_to(folder)), p.stat().st_size, p.stat().st_mtime_ns) for p in folder.rglob("*"))


def run_cli(cwd, *args):
    """Run test_model.py in cwd and check that it wrote nothing there."""
    before = listing(cwd)
    result = run_script("test_model.py", *args, cwd=cwd)
    assert listing(cwd) == before, "test_model.py must not write files"
    return result


def assert_fails_cleanly(result, check, *fragments):
    """Exit 1, no traceback, and one FAIL line (for `check`) that names the problem; others were not run."""
    everything = result.stdout + result.stderr
    assert result.returncode == 1, everything
    assert "Traceback" not in everything
    failed = [line for line in result.stdout.splitlines() if line.startswith("[FAIL]")]
    assert failed and failed[0].startswith(f"[FAIL] {check} "), everything
    for fragment in fragments:
        assert fragment in failed[0], failed[0]
    assert all("not run:" in line for line in failed[1:]), failed
    assert "checks failed" in result.stdout.splitlines()[-1]


def tiny_checkpoint(path, **changes):
    """One of our checkpoints of a tiny untrained cnn3 (fast to load; too weak to pass --min-accuracy)."""
    torch.manual_seed(0)
    ckpt = make_checkpoint(build_model("cnn3", TINY), "cnn3", TINY)
    ckpt["model"].update(changes)
    save_checkpoint(ckpt, path)
    return path


# ---------------------------------------------------------------- bad checkpoints


def make_missing(folder):
    return folder / "nope.pt"


def make_empty(folder):
    (folder / "empty.pt").write_bytes(b"")
    return folder / "empty.pt"


def make_truncated(folder):
    path = tiny_checkpoint(folder / "half.pt")
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    return path


def make_random(folder):
    gen = np.random.default_rng(0)
    (folder / "random.pt").write_bytes(gen.integers(0, 256, 100_000, dtype=np.uint8).tobytes())
    return folder / "random.pt"


def make_text(folder):
    (folder / "notes.pt").write_text("this is my model, trained for 30 epochs\n")
    return folder / "notes.pt"


def make_resnet(folder):
    torchvision = pytest.importorskip("torchvision")
    torch.save(torchvision.models.resnet18().state_dict(), folder / "resnet18.pt")
    return folder / "resnet18.pt"


CONV2_OUT_IN = tuple(build_model("cnn3").state_dict()["features.4.weight"].shape[:2])


def make_wrong_shape(folder):
    state_dict = build_model("cnn3").state_dict()
    state_dict["features.4.weight"] = torch.zeros(*CONV2_OUT_IN, 5, 5)  # a 5x5 kernel where cnn3 has 3x3
    torch.save(state_dict, folder / "wrong.pt")
    return folder / "wrong.pt"


def make_nan(folder):
    return tiny_checkpoint(folder / "nan.pt", **{"classifier.5.bias": torch.full((10,), float("nan"))})


BAD_CHECKPOINTS = {  # name: (how to make it, the check that fails, what its line must say)
    "missing": (make_missing, "file", ["nope.pt", "not found"]),
    "empty": (make_empty, "file", ["empty.pt", "empty"]),
    "truncated": (make_truncated, "load", ["half.pt", "truncated or corrupt"]),
    "random-bytes": (make_random, "load", ["random.pt", "not a PyTorch checkpoint"]),
    "text": (make_text, "load", ["notes.pt", "not a PyTorch checkpoint"]),
    "resnet18": (make_resnet, "load", ["resnet18.pt", "matches no known architecture"]),
    "wrong-shape": (make_wrong_shape, "load", [f"features.4.weight has shape {(*CONV2_OUT_IN, 5, 5)}, expected {(*CONV2_OUT_IN, 3, 3)}"]),
    "nan-weights": (make_nan, "weights finite", ["NaN/Inf", "classifier.5.bias"]),
}


@pytest.mark.parametrize("name", list(BAD_CHECKPOINTS))
def test_bad_checkpoint(tmp_path, small_data_dir, name):
    make, check, fragments = BAD_CHECKPOINTS[name]
    path = make(tmp_path)
    result = run_cli(tmp_path, "--model-path", path, "--data-dir", small_data_dir, *QUICK)
    assert_fails_cleanly(result, check, *fragments)


def test_code_running_pickle_is_refused_and_nothing_runs(tmp_path, small_data_dir):
    marker = tmp_path / "MARKER"
    torch.save({"model": RunsCode(marker)}, tmp_path / "evil.pt")
    # prove the file is armed: trusted unpickling does run its command
    torch.load(tmp_path / "evil.pt", weights_only=False)
    assert marker.exists()
    marker.unlink()
    result = run_cli(tmp_path, "--model-path", tmp_path / "evil.pt", "--data-dir", small_data_dir, *QUICK)
    assert_fails_cleanly(result, "load", "pickled Python objects", "--trust-pickle")
    assert not marker.exists()


# ---------------------------------------------------------------- bad data


def data_missing(folder):
    return folder / "no-such-folder"


def data_truncated(folder):
    write_split(folder / "d", "test", np.zeros((64, 28, 28), np.uint8), np.zeros(64, np.uint8))
    images = folder / "d" / FILES["test"][0]
    images.write_bytes(images.read_bytes()[:5000])
    return folder / "d"


def data_corrupt(folder):
    # a labels file in the images file's place: right size class, wrong magic number
    write_split(folder / "d", "test", np.zeros((64, 28, 28), np.uint8), np.zeros(64, np.uint8))
    write_idx(folder / "d" / FILES["test"][0], np.zeros(64, np.uint8), LABELS_MAGIC)
    return folder / "d"


@pytest.mark.parametrize("make, fragments", [
    (data_missing, ["not found", "no-such-folder", "apt-get install dataset-fashion-mnist", "--download"]),
    (data_truncated, ["truncated or corrupt"]),
    (data_corrupt, ["magic number 2049, expected 2051"]),
], ids=["missing", "truncated", "corrupt"])
def test_bad_data_folder(tmp_path, make, fragments):
    data_dir = make(tmp_path)
    ckpt = tiny_checkpoint(tmp_path / "model.pt")
    result = run_cli(tmp_path, "--model-path", ckpt, "--data-dir", data_dir, *QUICK)
    assert_fails_cleanly(result, "test data", *fragments)


# ---------------------------------------------------------------- usage errors


@pytest.mark.parametrize("value", ["0", "-1"])
def test_batches_must_be_positive(tmp_path, value):
    result = run_cli(tmp_path, "--batches", value)
    assert result.returncode == 2
    assert "--batches" in result.stderr and "must be >= 1" in result.stderr
    assert "Traceback" not in result.stderr + result.stdout


# ---------------------------------------------------------------- the happy path


def passed_count(stdout):
    return sum(line.startswith("[PASS]") for line in stdout.splitlines())


def test_trained_checkpoint_passes_every_check(tmp_path, trained_checkpoint, small_data_dir):
    result = run_cli(tmp_path, "--model-path", trained_checkpoint, "--data-dir", small_data_dir, "--device", "cpu")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "[FAIL]" not in result.stdout
    assert result.stdout.splitlines()[-1] == f"all {passed_count(result.stdout)} checks passed"
    for check in ("file", "load", "architecture", "weights finite", "device", "forward pass", "quick eval", "memory"):
        assert f"[PASS] {check} " in result.stdout


def test_json_report_is_one_document(tmp_path, trained_checkpoint, small_data_dir):
    result = run_cli(tmp_path, "--model-path", trained_checkpoint, "--data-dir", small_data_dir, "--json", *QUICK)
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)  # the whole stdout is one JSON document
    assert report["passed"] is True
    assert {c["name"] for c in report["checks"]} >= {"load", "architecture", "quick eval"}
    assert all(c["ok"] for c in report["checks"])


def test_full_evaluates_the_whole_real_test_set(tmp_path, real_data_dir):
    # a tiny untrained model keeps 10,000 CPU images fast; --min-accuracy 0 because it only guesses
    ckpt = tiny_checkpoint(tmp_path / "tiny.pt")
    result = run_cli(tmp_path, "--model-path", ckpt, "--data-dir", real_data_dir, "--full", "--json",
                     "--min-accuracy", "0", "--device", "cpu")
    assert result.returncode == 0, result.stdout + result.stderr
    checks = {c["name"]: c for c in json.loads(result.stdout)["checks"]}
    assert checks["test data"]["data"]["images"] == 10_000
    assert checks["quick eval"]["data"]["images"] == 10_000


def test_two_models_report_their_ensemble(tmp_path, trained_checkpoint, small_data_dir):
    # the second model is the same weights in a legacy DataParallel layout: same accuracy, and a second format
    weights = torch.load(trained_checkpoint, weights_only=True)["model"]
    torch.save({"state_dict": {"module." + k: v for k, v in weights.items()}}, tmp_path / "ddp.pt")
    result = run_cli(tmp_path, "--model-path", trained_checkpoint, tmp_path / "ddp.pt",
                     "--data-dir", small_data_dir, *QUICK)
    assert result.returncode == 0, result.stdout + result.stderr
    ensemble = [line for line in result.stdout.splitlines() if line.startswith("[PASS] ensemble ")]
    assert len(ensemble) == 1 and "2 models" in ensemble[0]
    assert result.stdout.splitlines()[-1] == f"all {passed_count(result.stdout)} checks passed"


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-only behaviour")
def test_require_gpu_fails_without_gpu(tmp_path, trained_checkpoint, small_data_dir):
    result = run_cli(tmp_path, "--model-path", trained_checkpoint, "--data-dir", small_data_dir,
                     "--require-gpu", *QUICK)
    assert_fails_cleanly(result, "device", "no CUDA GPU")


def test_unexpected_error_in_a_check_is_a_failed_check():
    # e.g. a CUDA error on a broken GPU: the pre-flight reports it instead of crashing
    def broken():
        raise RuntimeError("CUDA error: an illegal memory access was encountered\nmore detail")

    report = preflight.Report()
    assert report.run("device", broken) is None
    assert not report.passed
    assert report.checks[0].detail == (
        "unexpected RuntimeError: CUDA error: an illegal memory access was encountered (--debug shows more)"
    )
    with pytest.raises(RuntimeError):
        preflight.Report(debug=True).run("device", broken)

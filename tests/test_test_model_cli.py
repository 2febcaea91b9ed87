"""test_model.py run as a user runs it: every bad input is exit 1, one clear line, no traceback, nothing
written; the happy path passes every check. CLI cases run in-process in the fast loop; those whose path
differs (a refused pickle, the data folder, the GPU check, the happy path) also as a real process in the
slow one."""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import REPO, TINY, run_script, tiny_model, write_idx, write_split

import test_model
from fashion_ft import preflight, system
from fashion_ft.checkpoint import make_checkpoint, save_checkpoint
from fashion_ft.data import FILES, LABELS_MAGIC
from fashion_ft.model import build_model

SHIPPED = REPO / "model" / "mnist_cnn3.pt"
QUICK = ("--device", "cpu", "--batches", "1", "--batch-size", "64")


class RunsCode:
    """Unpickling this runs a shell command: what a malicious checkpoint does."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def touch_then(marker, weights):
    Path(marker).touch()
    return weights


class RunsCodeThenGivesWeights:
    """Unpickling this runs code, then yields real weights: a file that passes every later check."""

    def __init__(self, marker, weights):
        self.marker, self.weights = marker, weights

    def __reduce__(self):
        return touch_then, (str(self.marker), self.weights)


def listing(folder):
    """Every file under folder with its size and mtime: any write shows up."""
    return sorted((str(p.relative_to(folder)), p.stat().st_size, p.stat().st_mtime_ns) for p in folder.rglob("*"))


def cli_runner(mode: str, monkeypatch=None, capsys=None):
    """run(cwd, *args): test_model.py in cwd, in this process or as a real one, checked to write nothing
    there -> its exit code and output."""
    def run(cwd, *args):
        before = listing(cwd)
        if mode == "subprocess":
            result = run_script("test_model.py", *args, cwd=cwd)
        else:
            monkeypatch.chdir(cwd)
            try:
                code = test_model.main([str(a) for a in args])
            except SystemExit as exc:  # argparse's own usage errors
                code = exc.code
            result = subprocess.CompletedProcess(args, code, *capsys.readouterr())
        assert listing(cwd) == before, "test_model.py must not write files"
        return result

    return run


run_subprocess = cli_runner("subprocess")


@pytest.fixture(params=["in-process", pytest.param("subprocess", marks=pytest.mark.slow)])
def run_cli(request, monkeypatch, capsys):
    """A case that runs both in-process and as a real process (what the user's shell sees)."""
    return cli_runner(request.param, monkeypatch, capsys)


@pytest.fixture
def run_in_process(monkeypatch, capsys):
    """A case whose real-process twin would add nothing: the same code path as a run_cli case."""
    return cli_runner("in-process", monkeypatch, capsys)


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


def write(path, content: bytes):
    path.write_bytes(content)
    return path


def halve(path):
    return write(path, path.read_bytes()[: path.stat().st_size // 2])


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


RANDOM_BYTES = np.random.default_rng(0).integers(0, 256, 100_000, dtype=np.uint8).tobytes()
NAN_BIAS = {"classifier.5.bias": torch.full((10,), float("nan"))}
WRONG_SHAPE = f"features.4.weight has shape {(*CONV2_OUT_IN, 5, 5)}, expected {(*CONV2_OUT_IN, 3, 3)}"

BAD_CHECKPOINTS = {  # name: (how to make it in a folder, the check that fails, what its line must say)
    "missing": (lambda d: d / "nope.pt", "file", ["nope.pt", "not found"]),
    "empty": (lambda d: write(d / "empty.pt", b""), "file", ["empty.pt", "empty"]),
    "truncated": (lambda d: halve(tiny_checkpoint(d / "half.pt")), "load", ["half.pt", "truncated or corrupt"]),
    "random-bytes": (lambda d: write(d / "random.pt", RANDOM_BYTES), "load", ["random.pt", "not a PyTorch checkpoint"]),
    "text": (lambda d: write(d / "notes.pt", b"this is my model, trained for 30 epochs\n"), "load",
             ["notes.pt", "not a PyTorch checkpoint"]),
    "resnet18": (make_resnet, "load", ["resnet18.pt", "matches no known architecture"]),
    "wrong-shape": (make_wrong_shape, "load", [WRONG_SHAPE]),
    "nan-weights": (lambda d: tiny_checkpoint(d / "nan.pt", **NAN_BIAS), "weights finite",
                    ["NaN/Inf", "classifier.5.bias"]),
}


@pytest.mark.parametrize("make, check, fragments", BAD_CHECKPOINTS.values(), ids=list(BAD_CHECKPOINTS))
def test_bad_checkpoint(tmp_path, small_data_dir, make, check, fragments, run_in_process):
    result = run_in_process(tmp_path, "--model-path", make(tmp_path), "--data-dir", small_data_dir, *QUICK)
    assert_fails_cleanly(result, check, *fragments)


def test_code_running_pickle_is_refused_and_nothing_runs(tmp_path, small_data_dir, run_cli):
    marker = tmp_path / "MARKER"
    torch.save({"model": RunsCode(marker)}, tmp_path / "evil.pt")
    # prove the file is armed: trusted unpickling does run its command
    torch.load(tmp_path / "evil.pt", weights_only=False)
    assert marker.exists()
    marker.unlink()
    result = run_cli(tmp_path, "--model-path", tmp_path / "evil.pt", "--data-dir", small_data_dir, *QUICK)
    assert_fails_cleanly(result, "load", "pickled Python objects", "--trust-pickle")
    assert not marker.exists()


def test_trusted_unpickling_is_reported_as_such(tmp_path, small_data_dir, trained_checkpoint, run_in_process):
    marker = tmp_path / "MARKER"
    weights = torch.load(trained_checkpoint, weights_only=True)["model"]
    torch.save({"model_state_dict": RunsCodeThenGivesWeights(marker, weights)}, tmp_path / "armed.pt")
    (tmp_path / "cwd").mkdir()
    result = run_in_process(tmp_path / "cwd", "--model-path", tmp_path / "armed.pt", "--data-dir", small_data_dir,
                            "--trust-pickle", *QUICK)
    assert marker.exists()  # its code ran, as --trust-pickle allows
    load = next(line for line in result.stdout.splitlines() if line.startswith("[PASS] load"))
    assert "trusted unpickling" in load and "weights_only=True" not in load, load


def test_repeated_model_path_flags_accumulate(tmp_path, small_data_dir, trained_checkpoint, run_in_process):
    result = run_in_process(tmp_path, "--model-path", tmp_path / "missing.pt", "--model-path", trained_checkpoint,
                                   "--data-dir", small_data_dir, *QUICK)
    assert result.returncode == 1
    assert "missing.pt: not found" in result.stdout and "ensemble" in result.stdout


# ---------------------------------------------------------------- bad data


def blank_test_split(folder, n=64):
    """folder/d holding a test split of n blank images."""
    write_split(folder / "d", "test", np.zeros((n, 28, 28), np.uint8), np.zeros(n, np.uint8))
    return folder / "d"


def data_truncated(folder):
    halve(blank_test_split(folder) / FILES["test"][0])
    return folder / "d"


def data_corrupt(folder):
    # a labels file in the images file's place: right size class, wrong magic number
    write_idx(blank_test_split(folder) / FILES["test"][0], np.zeros(64, np.uint8), LABELS_MAGIC)
    return folder / "d"


@pytest.mark.parametrize("make, fragments", [
    (lambda d: d / "no-such-folder",
     ["not found", "no-such-folder", "apt-get install dataset-fashion-mnist", "--download"]),
    (data_truncated, ["truncated or corrupt"]),
    (data_corrupt, ["magic number 2049, expected 2051"]),
], ids=["missing", "truncated", "corrupt"])
def test_bad_data_folder(tmp_path, make, fragments, run_in_process):
    data_dir = make(tmp_path)
    ckpt = tiny_checkpoint(tmp_path / "model.pt")
    result = run_in_process(tmp_path, "--model-path", ckpt, "--data-dir", data_dir, *QUICK)
    assert_fails_cleanly(result, "test data", *fragments)


# ---------------------------------------------------------------- usage errors


@pytest.mark.parametrize("value", ["0", "-1"])
def test_batches_must_be_positive(tmp_path, value, run_in_process):
    result = run_in_process(tmp_path, "--batches", value)
    assert result.returncode == 2
    assert "--batches" in result.stderr and "must be >= 1" in result.stderr
    assert "Traceback" not in result.stderr + result.stdout


# ---------------------------------------------------------------- the happy path


EVERY_CHECK = ("device", "test data", "file", "load", "architecture", "weights finite", "forward pass",
               "train step", "quick eval", "memory")


def passed_count(stdout):
    return sum(line.startswith("[PASS]") for line in stdout.splitlines())


def test_trained_checkpoint_passes_every_check(tmp_path, trained_checkpoint, small_data_dir, run_in_process):
    result = run_in_process(tmp_path, "--model-path", trained_checkpoint, "--data-dir", small_data_dir,
                            "--device", "cpu")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "[FAIL]" not in result.stdout
    assert result.stdout.splitlines()[-1] == f"all {passed_count(result.stdout)} checks passed"
    for check in EVERY_CHECK:
        assert f"[PASS] {check} " in result.stdout


@pytest.mark.slow
def test_json_report_is_one_document(tmp_path, trained_checkpoint, small_data_dir):
    result = run_subprocess(tmp_path, "--model-path", trained_checkpoint, "--data-dir", small_data_dir, "--json",
                            *QUICK)
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)  # the whole stdout is one JSON document
    assert report["passed"] is True
    assert {c["name"] for c in report["checks"]} >= {"load", "architecture", "quick eval"}
    assert all(c["ok"] for c in report["checks"])


def test_full_evaluates_the_whole_real_test_set(tmp_path, real_data_dir, run_in_process):
    # a tiny untrained model keeps 10,000 CPU images fast; --min-accuracy 0 because it only guesses
    ckpt = tiny_checkpoint(tmp_path / "tiny.pt")
    result = run_in_process(tmp_path, "--model-path", ckpt, "--data-dir", real_data_dir, "--full", "--json",
                            "--min-accuracy", "0", "--device", "cpu")
    assert result.returncode == 0, result.stdout + result.stderr
    checks = {c["name"]: c for c in json.loads(result.stdout)["checks"]}
    assert checks["test data"]["data"]["images"] == 10_000
    assert checks["quick eval"]["data"]["images"] == 10_000


def test_two_models_report_their_ensemble(tmp_path, trained_checkpoint, small_data_dir, run_in_process):
    # the second model is the same weights in a legacy DataParallel layout: same accuracy, and a second format
    weights = torch.load(trained_checkpoint, weights_only=True)["model"]
    torch.save({"state_dict": {"module." + k: v for k, v in weights.items()}}, tmp_path / "ddp.pt")
    result = run_in_process(tmp_path, "--model-path", trained_checkpoint, tmp_path / "ddp.pt",
                            "--data-dir", small_data_dir, *QUICK)
    assert result.returncode == 0, result.stdout + result.stderr
    ensemble = [line for line in result.stdout.splitlines() if line.startswith("[PASS] ensemble ")]
    assert len(ensemble) == 1 and "2 models" in ensemble[0]
    assert result.stdout.splitlines()[-1] == f"all {passed_count(result.stdout)} checks passed"


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-only behaviour")
def test_require_gpu_fails_without_gpu(tmp_path, small_data_dir, run_cli):
    result = run_cli(tmp_path, "--model-path", SHIPPED, "--data-dir", small_data_dir, "--require-gpu", *QUICK)
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


def test_shipped_model_passes_every_check(tmp_path, small_data_dir, run_cli):
    result = run_cli(tmp_path, "--model-path", SHIPPED, "--data-dir", small_data_dir, *QUICK)
    assert result.returncode == 0, result.stdout + result.stderr
    for check in EVERY_CHECK:
        assert f"[PASS] {check} " in result.stdout, result.stdout
    assert result.stdout.splitlines()[-1] == f"all {len(EVERY_CHECK)} checks passed"


# ---------------------------------------------------------------- degenerate data


def strict_json(text):
    """json.loads that refuses NaN and Infinity, as a strict parser does."""
    def refuse(name):
        raise ValueError(f"{name} is not JSON")
    return json.loads(text, parse_constant=refuse)


@pytest.mark.parametrize("n", [0, preflight.MIN_TEST_IMAGES - 1])
def test_too_small_test_set_is_a_failed_check_naming_the_file(tmp_path, n, run_in_process):
    args = ("--model-path", tiny_checkpoint(tmp_path / "model.pt"), "--data-dir", blank_test_split(tmp_path, n), *QUICK)
    assert_fails_cleanly(run_in_process(tmp_path, *args), "test data", FILES["test"][0], f" {n} ")
    report = strict_json(run_in_process(tmp_path, *args, "--json").stdout)
    assert report["passed"] is False
    assert [c["name"] for c in report["checks"] if not c["ok"]] == ["test data", "quick eval"]


def test_report_json_is_strict():
    report = preflight.Report()
    report.run("quick eval", lambda: ("nan", {"loss": float("inf"), "accuracy": float("nan"), "images": 3,
                                             "per_class": {"Bag": float("-inf"), "Shirt": 0.5}}, None))
    data = strict_json(json.dumps(report.to_dict(), allow_nan=False))["checks"][0]["data"]
    assert data == {"loss": None, "accuracy": None, "images": 3, "per_class": {"Bag": None, "Shirt": 0.5},
                    "nonfinite": {"loss": "was Infinity", "accuracy": "was NaN", "per_class.Bag": "was -Infinity"}}


# ---------------------------------------------------------------- the GPU and the training step


def test_gpu_without_working_cuda_fails_instead_of_passing_on_the_cpu(broken_cuda, tmp_path, small_data_dir,
                                                                     run_in_process):
    result = run_in_process(tmp_path, "--model-path", tiny_checkpoint(tmp_path / "model.pt"), "--data-dir",
                            small_data_dir, "--batches", "1", "--batch-size", "64", "--min-accuracy", "0")
    assert result.returncode == 1
    device = next(line for line in result.stdout.splitlines() if " device " in line)
    assert device.startswith("[FAIL] device ") and "an NVIDIA GPU is present (/dev/nvidia0)" in device
    assert "driver on your system is too old" in device
    assert "checks passed" not in result.stdout and "Traceback" not in result.stderr


def test_gpu_without_working_cuda_still_checks_on_an_explicit_cpu(broken_cuda, tmp_path, small_data_dir,
                                                                 run_in_process):
    result = run_in_process(tmp_path, "--model-path", tiny_checkpoint(tmp_path / "model.pt"), "--data-dir",
                            small_data_dir, *QUICK, "--min-accuracy", "0")
    assert result.returncode == 0, result.stdout


@pytest.fixture
def v100(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (7, 0))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "Tesla V100-SXM2-32GB")
    monkeypatch.setattr(torch.version, "hip", None)


@pytest.mark.parametrize("args, flag", [(("--amp", "bf16"), "--amp bf16: Tesla V100"),
                                        (("--amp", "fp16", "--device", "cpu"), "--amp fp16: for CUDA GPUs only")])
def test_precision_the_device_cannot_do_is_a_usage_error(v100, tmp_path, run_in_process, args, flag):
    result = run_in_process(tmp_path, "--model-path", SHIPPED, *args)
    assert result.returncode == 2 and result.stdout == ""
    assert result.stderr.startswith(f"error: {flag}") and result.stderr.count("\n") == 1


@pytest.mark.parametrize("native_bf16, policy", [(True, "bf16"), (False, "off")])
def test_train_step_runs_under_the_policy_finetune_picks(monkeypatch, native_bf16, policy):
    monkeypatch.setattr(system, "cpu_has_fast_bf16", lambda: native_bf16)
    model = tiny_model()
    weights = {k: v.clone() for k, v in model.state_dict().items()}
    detail, data, _ = preflight.check_train_step(model, None, 0.286, 0.353, torch.device("cpu"))
    assert data["amp"] == policy and f"under amp {policy}" in detail and "weights updated" in detail
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in weights.items()), "the checked model must not change"


class NanWhenTraining(torch.nn.Module):
    """Finite in evaluation, NaN in training: what a broken fp16/bf16 kernel looks like to the check."""

    def __init__(self):
        super().__init__()
        self.linear = torch.nn.Linear(28 * 28, 10)

    def forward(self, x):
        out = self.linear(x.flatten(1))
        return out * float("nan") if self.training else out


class FailsWhenTraining(NanWhenTraining):
    def forward(self, x):
        if self.training:
            raise RuntimeError("CUDA error: CUBLAS_STATUS_NOT_SUPPORTED when calling cublasGemmEx\nmore")
        return super().forward(x)


@pytest.mark.parametrize("model, detail", [
    (NanWhenTraining, r"the training step under amp \w+ gave a non-finite loss or output"),
    (FailsWhenTraining, re.escape("unexpected RuntimeError: CUDA error: CUBLAS_STATUS_NOT_SUPPORTED when calling "
                                  "cublasGemmEx (--debug shows more)")),
], ids=["non-finite", "error"])
def test_broken_train_step_is_a_one_line_failed_check(model, detail):
    report = preflight.Report()
    assert report.run("train step", preflight.check_train_step, model(), None, 0.0, 1.0, torch.device("cpu")) is None
    assert not report.passed and re.fullmatch(detail, report.checks[0].detail), report.checks[0].detail


def test_peak_gpu_memory_is_reset_and_reported_per_model(tmp_path, small_data_dir, monkeypatch, run_in_process):
    resets, peaks = [], iter([12.5, 30.0])
    monkeypatch.setattr(system, "reset_peak_memory", resets.append)
    monkeypatch.setattr(preflight, "peak_gpu_mb", lambda device: next(peaks))
    first, second = tiny_checkpoint(tmp_path / "a.pt"), tiny_checkpoint(tmp_path / "b.pt")
    result = run_in_process(tmp_path, "--model-path", first, second, "--data-dir", small_data_dir, "--json", *QUICK,
                            "--min-accuracy", "0")
    assert result.returncode == 0, result.stdout
    checks = {c["name"]: c for c in strict_json(result.stdout)["checks"]}
    assert checks[f"{first}: memory"]["data"]["peak_gpu_mb"] == 12.5
    assert checks[f"{second}: memory"]["data"]["peak_gpu_mb"] == 30.0
    assert resets == [torch.device("cpu")] * 2


@pytest.mark.slow
def test_reader_that_goes_away_ends_quietly(small_data_dir):
    # `test_model.py | head -0`: the reader is gone before the report is printed
    proc = subprocess.Popen([sys.executable, str(REPO / "test_model.py"), "--model-path", str(SHIPPED),
                             "--data-dir", str(small_data_dir), *QUICK],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    proc.stdout.close()
    err = proc.stderr.read()
    assert (proc.wait(timeout=300), err) == (1, "")

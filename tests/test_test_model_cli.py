"""test_model.py run as a user runs it: every bad input is exit 1, one FAIL line that names it (later checks
not run), no traceback, nothing written; a good model passes every check."""

import json
import os
import re
import subprocess
import sys

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
QUICK = {"--device": "cpu", "--batches": "1", "--batch-size": "64"}
EVERY_CHECK = ("device", "test data", "file", "load", "architecture", "weights finite", "forward pass",
               "train step", "quick eval", "memory")


def listing(folder):
    """Every file under folder with its size and mtime: any write shows up."""
    return sorted((str(p.relative_to(folder)), p.stat().st_size, p.stat().st_mtime_ns) for p in folder.rglob("*"))


def argv(flags: dict) -> list:
    """{flag: a value, a list of values, a tuple (the flag once per value), or None (left out)} -> argv."""
    pairs = [(flag, v) for flag, value in flags.items() for v in (value if isinstance(value, tuple) else [value])]
    return [str(a) for flag, v in pairs if v is not None for a in (flag, *(v if isinstance(v, list) else [v]))]


@pytest.fixture
def run(monkeypatch, capsys):
    """run(cwd, flags, mode=): test_model.py in cwd, in this process or as a real one, checked to write
    nothing there (a code-running pickle's marker included) -> its exit code and output."""
    def run(cwd, flags, mode="in-process"):
        before = listing(cwd)
        if mode == "subprocess":
            result = run_script("test_model.py", *argv(flags), cwd=cwd)
        else:
            monkeypatch.chdir(cwd)
            result = subprocess.CompletedProcess(flags, test_model.main(argv(flags)), *capsys.readouterr())
        assert listing(cwd) == before, "test_model.py must not write files"
        return result

    return run


def strict_json(text):
    """json.loads that refuses NaN and Infinity, as a strict parser does."""
    return json.loads(text, parse_constant=lambda name: pytest.fail(f"{name} is not JSON"))


def tiny_checkpoint(path, **changes):
    """One of our checkpoints of a tiny untrained cnn3 (fast to load; it only guesses)."""
    torch.manual_seed(0)
    ckpt = make_checkpoint(build_model("cnn3", TINY), "cnn3", TINY)
    ckpt["model"].update(changes)
    save_checkpoint(ckpt, path)
    return path


# ---------------------------------------------------------------- what a user gives it


class RunsCode:
    """Unpickling this runs a shell command: what a malicious checkpoint does."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def armed_pickle(folder):
    torch.save({"model": RunsCode(folder / "MARKER")}, folder / "evil.pt")
    torch.load(folder / "evil.pt", weights_only=False)  # the file is armed: trusted unpickling runs its command
    (folder / "MARKER").unlink()
    return folder / "evil.pt"


def write(path, content: bytes):
    path.write_bytes(content)
    return path


def halve(path):
    return write(path, path.read_bytes()[: path.stat().st_size // 2])


def make_resnet(folder):
    torchvision = pytest.importorskip("torchvision")
    torch.save(torchvision.models.resnet18().state_dict(), folder / "resnet18.pt")
    return folder / "resnet18.pt"


def make_wrong_shape(folder):
    state_dict = build_model("cnn3", TINY).state_dict()
    state_dict["features.4.weight"] = torch.zeros(8, 4, 5, 5)  # a 5x5 kernel where cnn3 has 3x3
    torch.save(state_dict, folder / "wrong.pt")
    return folder / "wrong.pt"


def blank_test_split(folder, n=64):
    """folder/d holding a test split of n blank images."""
    write_split(folder / "d", "test", np.zeros((n, 28, 28), np.uint8), np.zeros(n, np.uint8))
    return folder / "d"


def corrupt_test_split(folder):
    # a labels file in the images file's place: right size class, wrong magic number
    write_idx(blank_test_split(folder) / FILES["test"][0], np.zeros(64, np.uint8), LABELS_MAGIC)
    return folder / "d"


def two_models(folder, fixture):
    # the trained weights again in a legacy DataParallel layout: the same accuracy, and a second format
    trained = fixture("trained_checkpoint")
    weights = torch.load(trained, weights_only=True)["model"]
    torch.save({"state_dict": {"module." + k: v for k, v in weights.items()}}, folder / "ddp.pt")
    return {"--model-path": (trained, folder / "ddp.pt")}  # the flag twice: they add up


def model(make):
    return lambda folder, fixture: {"--model-path": make(folder)}


def data(make):
    return lambda folder, fixture: {"--data-dir": make(folder)}


RANDOM_BYTES = np.random.default_rng(0).integers(0, 256, 100_000, dtype=np.uint8).tobytes()
NAN_BIAS = {"classifier.5.bias": torch.full((10,), float("nan"))}
NO_GPU = pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-only behaviour")

CASES = {  # name: (flags for a folder, the check that fails or None, what its line, or else stdout, says)
    "missing": (model(lambda d: d / "nope.pt"), "file", "nope.pt", "not found"),
    "empty": (model(lambda d: write(d / "empty.pt", b"")), "file", "empty.pt", "empty"),
    "a folder": (model(lambda d: d), "file", "not a file"),
    "truncated": (model(lambda d: halve(tiny_checkpoint(d / "h.pt"))), "load", "h.pt", "truncated or corrupt"),
    "random bytes": (model(lambda d: write(d / "r.pt", RANDOM_BYTES)), "load", "r.pt", "not a PyTorch checkpoint"),
    "text": (model(lambda d: write(d / "t.pt", b"my model, 30 epochs\n")), "load", "t.pt", "not a PyTorch checkpoint"),
    "resnet18": (model(make_resnet), "load", "resnet18.pt", "matches no known architecture"),
    "wrong shape": (model(make_wrong_shape), "load", "features.4.weight has shape (8, 4, 5, 5), expected (8, 4, 3, 3)"),
    "nan weights": (model(lambda d: tiny_checkpoint(d / "nan.pt", **NAN_BIAS)), "weights finite", "classifier.5.bias"),
    "code-running pickle": (model(armed_pickle), "load", "pickled Python objects", "--trust-pickle"),
    "one of two missing": (lambda d, _: {"--model-path": [d / "missing.pt", tiny_checkpoint(d / "m.pt")]}, "file",
                           "missing.pt: not found"),
    "no data": (data(lambda d: d / "no-such-folder"), "test data", "not found", "no-such-folder",
                "apt-get install dataset-fashion-mnist", "--download"),
    "data truncated": (data(lambda d: halve(blank_test_split(d) / FILES["test"][0]).parent), "test data",
                       "truncated or corrupt"),
    "data corrupt": (data(corrupt_test_split), "test data", "magic number 2049, expected 2051"),
    "no test images": (data(lambda d: blank_test_split(d, 0)), "test data", FILES["test"][0], " 0 "),
    # auto beside an NVIDIA GPU that CUDA cannot use: fail, not pass on the CPU
    "GPU CUDA cannot use": (lambda d, fixture: fixture("broken_cuda") or {"--device": None}, "device",
                            "NVIDIA GPU is present", "driver on your system is too old"),
    "--require-gpu without one": (lambda d, _: {"--require-gpu": []}, "device", "no CUDA GPU"),
    "shipped": (lambda d, _: {"--model-path": SHIPPED}, None),
    "trained, 3 batches": (lambda d, fixture: {"--model-path": fixture("trained_checkpoint"), "--batches": None,
                                               "--batch-size": None}, None),
    "--device cpu beside a GPU CUDA cannot use": (
        lambda d, fixture: fixture("broken_cuda") or {"--model-path": fixture("trained_checkpoint")}, None),
    "two models": (two_models, None, "2 models, averaged probabilities"),
    "--full: every real test image": (
        lambda d, fixture: {"--data-dir": fixture("real_data_dir"), "--full": [], "--min-accuracy": "0"}, None,
        "10000 Fashion-MNIST test images", "10000 test images: accuracy"),
}
SUBPROCESS_TOO = ("code-running pickle", "--require-gpu without one", "shipped")  # their path differs there


@pytest.mark.parametrize("case, mode", [
    pytest.param(name, mode, id=f"{name}-{mode}", marks=[NO_GPU] * (name == "--require-gpu without one")
                 + [pytest.mark.slow] * (mode == "subprocess"))
    for name in CASES for mode in ("in-process", "subprocess")[:1 + (name in SUBPROCESS_TOO)]])
def test_what_a_user_gives_it(case, mode, tmp_path, small_data_dir, request, run):
    make, check, *fragments = CASES[case]
    flags = {"--model-path": tiny_checkpoint(tmp_path / "model.pt"), "--data-dir": small_data_dir, **QUICK,
             "--min-accuracy": "0" if check else None, **make(tmp_path, request.getfixturevalue)}
    result = run(tmp_path, flags, mode)
    assert result.returncode == (1 if check else 0) and "Traceback" not in result.stderr, result
    *lines, summary = result.stdout.splitlines()
    failed = [line for line in lines if line.startswith("[FAIL]")]
    assert summary.startswith(f"{len(failed)} of {len(lines)} checks failed" if check
                              else f"all {len(lines)} checks passed"), result.stdout
    if check:
        assert failed and re.match(rf"\[FAIL\] (\S+: )?{check} ", failed[0]), lines
        assert all("not run:" in line for line in failed[1:]), failed
    assert all(fragment in (failed[0] if check else result.stdout) for fragment in fragments), result.stdout
    for passed in () if check else EVERY_CHECK:
        assert any(re.match(rf"\[PASS\] (\S+: )?{passed} ", line) for line in lines), (passed, lines)


def test_trusted_unpickling_is_reported_as_such(tmp_path, small_data_dir, trained_checkpoint, run):
    weights = torch.load(trained_checkpoint, weights_only=True)["model"]
    torch.save({"model_state_dict": weights, "extra": RunsCode(tmp_path / "MARKER")}, tmp_path / "armed.pt")
    (tmp_path / "cwd").mkdir()
    result = run(tmp_path / "cwd", {"--model-path": tmp_path / "armed.pt", "--data-dir": small_data_dir,
                                    "--trust-pickle": [], **QUICK})
    assert (tmp_path / "MARKER").exists()  # its code ran, as --trust-pickle allows
    load = next(line for line in result.stdout.splitlines() if line.startswith("[PASS] load"))
    assert "trusted unpickling" in load and "weights_only=True" not in load, load


@pytest.mark.parametrize("flags, flag", [({"--amp": "bf16"}, "--amp bf16: Tesla V100"),
                                         ({"--amp": "fp16", "--device": "cpu"}, "--amp fp16: for CUDA GPUs only")])
def test_precision_the_device_cannot_do_is_a_usage_error(monkeypatch, tmp_path, run, flags, flag):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # a V100: no native bf16
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (7, 0))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "Tesla V100-SXM2-32GB")
    monkeypatch.setattr(torch.version, "hip", None)
    result = run(tmp_path, {"--model-path": SHIPPED, **flags})
    assert result.returncode == 2 and result.stdout == ""
    assert result.stderr.startswith(f"error: {flag}") and result.stderr.count("\n") == 1


def test_peak_gpu_memory_is_reset_and_reported_per_model(tmp_path, small_data_dir, monkeypatch, run):
    resets, peaks = [], iter([12.5, 30.0])
    monkeypatch.setattr(system, "reset_peak_memory", resets.append)
    monkeypatch.setattr(system, "peak_gpu_mb", lambda device: next(peaks))
    first, second = tiny_checkpoint(tmp_path / "a.pt"), tiny_checkpoint(tmp_path / "b.pt")
    result = run(tmp_path, {"--model-path": [first, second], "--data-dir": small_data_dir, "--json": [], **QUICK,
                            "--min-accuracy": "0"})
    checks = {c["name"]: c for c in strict_json(result.stdout)["checks"]}
    assert result.returncode == 0 and resets == [torch.device("cpu")] * 2
    assert [checks[f"{p}: memory"]["data"]["peak_gpu_mb"] for p in (first, second)] == [12.5, 30.0]


@pytest.mark.slow
def test_reader_that_goes_away_ends_quietly(small_data_dir):
    # `test_model.py | head -0`: the reader is gone before the report is printed
    flags = {"--model-path": SHIPPED, "--data-dir": small_data_dir, **QUICK}
    proc = subprocess.Popen([sys.executable, str(REPO / "test_model.py"), *argv(flags)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    proc.stdout.close()
    err = proc.stderr.read()
    assert (proc.wait(timeout=300), err) == (1, "")


# ---------------------------------------------------------------- the report and the training step


def test_a_failing_check_is_one_line_and_the_json_strict():
    def broken():  # e.g. a CUDA error on a broken GPU: the pre-flight reports it instead of crashing
        raise RuntimeError("CUDA error: an illegal memory access was encountered\nmore detail")

    report = preflight.Report()
    assert report.run("device", broken) is None and not report.passed
    assert report.checks[0]["detail"] == (
        "unexpected RuntimeError: CUDA error: an illegal memory access was encountered (--debug shows more)")
    with pytest.raises(RuntimeError):
        preflight.Report(debug=True).run("device", broken)
    report.run("quick eval", lambda: ("nan", {"loss": float("inf"), "accuracy": float("nan"), "images": 3,
                                             "per_class": {"Bag": float("-inf"), "Shirt": 0.5}}, True))
    assert strict_json(json.dumps(report.checks, allow_nan=False))[1]["data"] == {
        "loss": None, "accuracy": None, "images": 3, "per_class": {"Bag": None, "Shirt": 0.5},
        "nonfinite": {"loss": "was Infinity", "accuracy": "was NaN", "per_class.Bag": "was -Infinity"}}


class BreaksWhenTraining(torch.nn.Module):
    """Right in evaluation, broken in training: what a bad fp16/bf16 kernel looks like to the check."""

    def __init__(self, error: bool):
        super().__init__()
        self.linear, self.error = torch.nn.Linear(28 * 28, 10), error

    def forward(self, x):
        if self.training and self.error:
            raise RuntimeError("CUDA error: CUBLAS_STATUS_NOT_SUPPORTED when calling cublasGemmEx\nmore")
        return self.linear(x.flatten(1)) * (float("nan") if self.training else 1)


@pytest.mark.parametrize("model, native_bf16, detail", [
    (tiny_model, True, r"forward, backward and \w+ step under amp bf16: loss \d\.\d+, weights updated"),
    (tiny_model, False, r"forward, backward and \w+ step under amp off: loss \d\.\d+, weights updated"),
    (lambda: BreaksWhenTraining(error=False), False, r"the \w+ step under amp off gave a non-finite loss or output"),
    (lambda: BreaksWhenTraining(error=True), False, re.escape(
        "unexpected RuntimeError: CUDA error: CUBLAS_STATUS_NOT_SUPPORTED when calling cublasGemmEx (--debug shows "
        "more)")),
], ids=["bf16", "fp32", "non-finite", "error"])
def test_train_step_runs_as_finetune_would_and_fails_in_one_line(monkeypatch, model, native_bf16, detail):
    monkeypatch.setattr(system, "cpu_has_fast_bf16", lambda: native_bf16)  # what --amp auto picks on this CPU
    net = model()
    weights = {k: v.clone() for k, v in net.state_dict().items()}
    report = preflight.Report()
    report.run("train step", preflight.check_train_step, net, None, 0.286, 0.353, torch.device("cpu"))
    assert re.fullmatch(detail, report.checks[0]["detail"]), report.checks[0]["detail"]
    assert all(torch.equal(v, net.state_dict()[k]) for k, v in weights.items()), "the checked model must not change"

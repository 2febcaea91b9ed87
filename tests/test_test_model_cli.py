"""test_model.py run as a user runs it: every bad input is exit 1, one FAIL line that names it (later checks
not run), no traceback, nothing written; a good model passes every check."""

import json
import os
import re
import subprocess

import numpy as np
import pytest
import torch
from conftest import REPO, TINY, run_script, tiny_model, write_split

import test_model
from fashion_ft import preflight, system
from fashion_ft.checkpoint import load_checkpoint, make_checkpoint, save_checkpoint
from fashion_ft.data import FILES

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
    ckpt = make_checkpoint(tiny_model(), "cnn3", TINY)
    ckpt["model"].update(changes)
    save_checkpoint(ckpt, path)
    return path


# ---------------------------------------------------------------- what a user gives it


def armed_pickle(folder, fixture):
    marker = folder / "MARKER"  # unpickling this object runs a shell command, as a malicious checkpoint does
    torch.save({"model": type("RunsCode", (), {"__reduce__": lambda _: (os.system, (f"touch {marker}",))})()},
               folder / "evil.pt")
    torch.load(folder / "evil.pt", weights_only=False)  # the file is armed: trusted unpickling runs its command
    marker.unlink()
    return {"--model-path": folder / "evil.pt"}


def two_models(folder, fixture):
    # the trained weights again in a legacy DataParallel layout: the same accuracy, and a second format
    trained = fixture("trained_checkpoint")
    weights = torch.load(trained, weights_only=True)["model"]
    torch.save({"state_dict": {"module." + k: v for k, v in weights.items()}}, folder / "ddp.pt")
    return {"--model-path": (trained, folder / "ddp.pt")}  # the flag twice: they add up


def trusted_whole_model(folder, fixture):
    torch.save(load_checkpoint(fixture("trained_checkpoint")).build(), folder / "whole.pt")  # weights_only refuses it
    return {"--model-path": folder / "whole.pt", "--trust-pickle": []}


NAN_BIAS = {"classifier.5.bias": torch.full((10,), float("nan"))}
NO_GPU = pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-only behaviour")

# Each load_checkpoint and load_split refusal has its own test (test_checkpoint.py, test_data.py): here one of
# each kind shows that test_model.py reports it as one FAIL line.
CASES = {  # name: (flags for a folder, the check that fails or None, what its line, or else stdout, says)
    "empty": (lambda d, _: (d / "empty.pt").touch() or {"--model-path": d / "empty.pt"}, "file", "empty.pt", "empty"),
    "a folder": (lambda d, _: {"--model-path": d}, "file", "not a file"),
    "nan weights": (lambda d, _: {"--model-path": tiny_checkpoint(d / "nan.pt", **NAN_BIAS)}, "weights finite",
                    "classifier.5.bias"),
    "code-running pickle": (armed_pickle, "load", "pickled Python objects", "--trust-pickle"),
    "one of two missing": (lambda d, _: {"--model-path": [d / "missing.pt", tiny_checkpoint(d / "m.pt")]}, "file",
                           "missing.pt: not found"),
    "no data": (lambda d, _: {"--data-dir": d / "no-such-folder"}, "test data", "not found", "no-such-folder",
                "apt-get install dataset-fashion-mnist", "--download"),
    "no test images": (lambda d, _: write_split(d, "test", np.zeros((0, 28, 28)), []) or {"--data-dir": d}, "test data",
                       FILES["test"][0], " 0 "),
    "99 test images": (lambda d, _: write_split(d, "test", np.zeros((99, 28, 28)), [0] * 99) or {"--data-dir": d},
                       "test data", "only 99 images", "at least 100"),
    # auto beside an NVIDIA GPU that CUDA cannot use: fail, not pass on the CPU
    "GPU CUDA cannot use": (lambda d, fixture: fixture("broken_cuda") or {"--device": None}, "device",
                            "NVIDIA GPU is present", "driver on your system is too old"),
    "--require-gpu without one": (lambda d, _: {"--require-gpu": []}, "device", "no CUDA GPU"),
    "shipped, 3 batches": (lambda d, _: {"--model-path": SHIPPED, "--batches": None, "--batch-size": None}, None),
    "--device cpu beside a GPU CUDA cannot use": (
        lambda d, fixture: fixture("broken_cuda") or {"--model-path": fixture("trained_checkpoint")}, None),
    "two models": (two_models, None, "2 models, averaged probabilities"),
    "--trust-pickle: a whole pickled model": (trusted_whole_model, None, "loaded with trusted unpickling"),
    "--full: every real test image": (
        lambda d, fixture: {"--data-dir": fixture("real_data_dir"), "--full": [], "--min-accuracy": "0"}, None,
        "10000 Fashion-MNIST test images", "10000 test images: accuracy"),
}
SUBPROCESS_TOO = ("code-running pickle", "--require-gpu without one", "shipped, 3 batches")  # their path differs there


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


def test_precision_the_device_cannot_do_is_a_usage_error(tmp_path, run):
    # each device's refusals: test_system.py; here the script turns one into exit 2 before any check
    result = run(tmp_path, {"--model-path": SHIPPED, "--amp": "fp16", "--device": "cpu"})
    assert result.returncode == 2 and result.stdout == ""
    assert result.stderr.startswith("error: --amp fp16: for CUDA GPUs only") and result.stderr.count("\n") == 1


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


# ---------------------------------------------------------------- the report and the training step


def test_a_failing_check_is_one_line_and_the_json_strict():
    def broken():  # e.g. a CUDA error on a broken GPU: the pre-flight reports it instead of crashing
        raise RuntimeError("CUDA error: an illegal memory access was encountered\nmore detail")

    report = preflight.Report()
    assert report.run("device", broken) is None and not report.checks[0]["ok"]
    assert report.checks[0]["detail"] == (
        "unexpected RuntimeError: CUDA error: an illegal memory access was encountered (--debug shows more)")
    with pytest.raises(RuntimeError):
        preflight.Report(debug=True).run("device", broken)
    report.run("quick eval", lambda: ("nan", {"loss": float("inf"), "images": 3}, True))  # the rest: test_checkpoint
    assert strict_json(json.dumps(report.checks, allow_nan=False))[1]["data"] == {
        "loss": None, "images": 3, "nonfinite": {"loss": "was Infinity"}}


def nan_when_training():
    """A tiny cnn3, right in evaluation, NaN in training: what a bad fp16/bf16 kernel looks like to the check."""
    net = tiny_model()
    net.register_forward_hook(lambda module, _, out: out * float("nan") if module.training else out)
    return net


@pytest.mark.parametrize("model, native_bf16, detail", [
    (tiny_model, True, r"forward, backward and \w+ step under amp bf16: loss \d\.\d+, weights updated"),
    (tiny_model, False, r"forward, backward and \w+ step under amp off: loss \d\.\d+, weights updated"),
    (nan_when_training, False, r"the \w+ step under amp off gave a non-finite loss or weights"),
], ids=["bf16", "fp32", "non-finite"])  # a step that raises: test_a_failing_check_is_one_line_and_the_json_strict
def test_train_step_runs_as_finetune_would_and_fails_in_one_line(monkeypatch, model, native_bf16, detail):
    monkeypatch.setattr(system, "cpu_has_fast_bf16", lambda: native_bf16)  # what --amp auto picks on this CPU
    net = model()
    weights = {k: v.clone() for k, v in net.state_dict().items()}
    report = preflight.Report()
    report.run("train step", preflight.check_train_step, net, None, 0.286, 0.353, torch.device("cpu"))
    assert re.fullmatch(detail, report.checks[0]["detail"]), report.checks[0]["detail"]
    assert all(torch.equal(v, net.state_dict()[k]) for k, v in weights.items()), "the checked model must not change"

"""A table of bad inputs to both scripts: each exits with the right code, names the problem in one line
on stderr, and creates or changes no file."""

import shutil

import pytest
import torch
from conftest import run_script

import finetune_gpu
import test_model

# (extra flags, exit code, text the error must contain). Every case also gets valid model/data/output flags.
FINETUNE_CASES = {
    "lr zero": (["--lr", "0"], 2, "--lr"),
    "lr negative": (["--lr", "-1"], 2, "--lr"),
    "lr not a number": (["--lr", "abc"], 2, "--lr"),
    "batch size zero": (["--batch-size", "0"], 2, "--batch-size"),
    "epochs zero": (["--epochs", "0"], 2, "--epochs"),
    "patience negative": (["--patience", "-1"], 2, "--patience"),
    "min-delta negative": (["--min-delta", "-0.1"], 2, "--min-delta"),
    "val size zero": (["--val-size", "0"], 2, "--val-size"),
    "val size too large": (["--val-size", "3000"], 2, "--val-size"),
    "limit-train below batch": (["--limit-train", "10"], 2, "--limit-train"),
    "limit-train above data": (["--limit-train", "99999"], 2, "--limit-train"),
    "cuda without a GPU": (["--device", "cuda"], 2, "--device"),
    "cuda:7 without a GPU": (["--device", "cuda:7"], 2, "--device"),
    "unknown device": (["--device", "tpu"], 2, "--device"),
    "unknown scheduler": (["--scheduler", "bogus"], 2, "--scheduler"),
    "unknown optimizer": (["--optimizer", "lion"], 2, "--optimizer"),
    "unknown flag": (["--learning-rate", "0.1"], 2, "--learning-rate"),
    "label smoothing 1.5": (["--label-smoothing", "1.5"], 2, "--label-smoothing"),
    "momentum 1.5": (["--momentum", "1.5"], 2, "--momentum"),
    "weight decay negative": (["--weight-decay", "-1"], 2, "--weight-decay"),
    "grad norm zero": (["--max-grad-norm", "0"], 2, "--max-grad-norm"),
    "ema decay 1": (["--ema-decay", "1"], 2, "--ema-decay"),
    "min-lr above lr": (["--min-lr", "0.1"], 2, "--min-lr"),
    "warmup longer than run": (["--warmup-epochs", "5", "--epochs", "3"], 2, "--warmup-epochs"),
    "onecycle with warmup": (["--scheduler", "onecycle", "--warmup-epochs", "1"], 2, "--warmup-epochs"),
    "freeze-conv from scratch": (["--freeze-conv", "--from-scratch"], 2, "--freeze-conv"),
    "sync-bn on cpu": (["--sync-bn"], 2, "--sync-bn"),
    "missing model": (["--model-path", "missing.pt"], 1, "checkpoint not found: missing.pt"),
    "missing data": (["--data-dir", "no_such_folder"], 1, "not found"),
    "output is the input": (["--output", "input.pt"], 2, "--output"),
    "output exists": (["--output", "existing/best.pt"], 2, "--overwrite"),
    "output under a file": (["--output", "input.pt/best.pt"], 1, "--output"),
    "resume from a best model": (["--resume", "input.pt"], 1, "not a resumable checkpoint"),
}

TEST_MODEL_CASES = {
    "batches zero": (["--batches", "0"], 2, "--batches"),
    "batches negative": (["--batches", "-1"], 2, "--batches"),
    "batch size not a number": (["--batch-size", "x"], 2, "--batch-size"),
    "cuda without a GPU": (["--device", "cuda"], 2, "--device"),
    "unknown amp": (["--amp", "fp8"], 2, "--amp"),
    "min-accuracy as a percentage": (["--min-accuracy", "90"], 2, "--min-accuracy"),
}


def snapshot(folder):
    return {p: p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture
def workdir(tmp_path, monkeypatch, trained_checkpoint):
    """A folder with input.pt and an earlier run's existing/best.pt; the scripts run inside it."""
    shutil.copy(trained_checkpoint, tmp_path / "input.pt")
    (tmp_path / "existing").mkdir()
    shutil.copy(trained_checkpoint, tmp_path / "existing" / "best.pt")
    monkeypatch.chdir(tmp_path)
    return tmp_path


def call(main, argv, capsys):
    """Run a script's main() in-process, as the command line would: argparse exits with SystemExit."""
    try:
        code = main(argv)
    except SystemExit as exc:
        code = exc.code
    return code, capsys.readouterr().err


@pytest.mark.parametrize("case", list(FINETUNE_CASES))
def test_finetune_bad_input(case, workdir, small_data_dir, capsys):
    extra, expected_code, expected_text = FINETUNE_CASES[case]
    base = {"--model-path": "input.pt", "--data-dir": str(small_data_dir), "--output": "out/best.pt",
            "--logdir": "tb", "--val-size": "500", "--batch-size": "64", "--device": "cpu"}
    for flag in extra:
        base.pop(flag, None)
    argv = [item for pair in base.items() for item in pair] + ["--epochs", "1", "--quiet", *extra]
    before = snapshot(workdir)
    code, err = call(finetune_gpu.main, argv, capsys)
    assert code == expected_code, err
    assert expected_text in err and "Traceback" not in err
    assert err.strip().splitlines()[-1].startswith(("error:", "finetune_gpu.py: error:"))
    assert snapshot(workdir) == before


@pytest.mark.parametrize("case", list(TEST_MODEL_CASES))
def test_test_model_bad_input(case, workdir, small_data_dir, capsys):
    extra, expected_code, expected_text = TEST_MODEL_CASES[case]
    argv = ["--model-path", "input.pt", "--data-dir", str(small_data_dir), *extra]
    before = snapshot(workdir)
    code, err = call(test_model.main, argv, capsys)
    assert code == expected_code, err
    assert expected_text in err and "Traceback" not in err
    assert snapshot(workdir) == before


def test_nan_weights_are_refused_by_both_scripts(workdir, small_data_dir):
    ckpt = torch.load("input.pt", weights_only=True)
    ckpt["model"]["classifier.5.bias"][0] = float("nan")
    torch.save(ckpt, "nan.pt")
    before = snapshot(workdir)
    tuned = run_script("finetune_gpu.py", "--model-path", "nan.pt", "--data-dir", small_data_dir,
                       "--output", "out/best.pt", cwd=workdir)
    assert tuned.returncode == 1 and "NaN/Inf weights in classifier.5.bias" in tuned.stderr
    checked = run_script("test_model.py", "--model-path", "nan.pt", "--data-dir", small_data_dir, cwd=workdir)
    assert checked.returncode == 1 and "weights finite" in checked.stdout
    assert snapshot(workdir) == before


def test_newer_checkpoint_format_is_refused(workdir, small_data_dir):
    ckpt = torch.load("input.pt", weights_only=True)
    ckpt["format_version"] = 99
    torch.save(ckpt, "future.pt")
    result = run_script("finetune_gpu.py", "--model-path", "future.pt", "--data-dir", small_data_dir,
                        "--output", "out/best.pt", cwd=workdir)
    assert result.returncode == 1 and "format version 99 is newer" in result.stderr
    assert not (workdir / "out").exists()

"""A table of bad inputs to both scripts: each exits with the right code, names the problem in one line
on stderr, and creates or changes no file."""

import gzip
import shutil
import struct
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import FILES, IMAGES_MAGIC, LABELS_MAGIC, REPO, run_script, write_idx, write_split

import finetune_gpu
import test_model

# (extra flags, exit code, text the error must contain). Every case also gets valid model/data/output flags.
FINETUNE_CASES = {
    "lr zero": (["--lr", "0"], 2, "--lr"),
    "lr negative": (["--lr", "-1"], 2, "--lr"),
    "lr not a number": (["--lr", "abc"], 2, "--lr"),
    "lr infinite": (["--lr", "inf"], 2, "--lr"),
    "lr nan": (["--lr", "nan"], 2, "--lr"),
    "weight decay infinite": (["--weight-decay", "inf"], 2, "--weight-decay"),
    "seed too large": (["--seed", str(2**70)], 2, "--seed"),
    "split seed negative": (["--split-seed", "-1"], 2, "--split-seed"),
    "unknown arch": (["--from-scratch", "--arch", "resnet50"], 2, "--arch"),
    "batch size zero": (["--batch-size", "0"], 2, "--batch-size"),
    "epochs zero": (["--epochs", "0"], 2, "--epochs"),
    "patience negative": (["--patience", "-1"], 2, "--patience"),
    "min-delta negative": (["--min-delta", "-0.1"], 2, "--min-delta"),
    "val size zero": (["--val-size", "0"], 2, "--val-size"),
    "val size tiny": (["--val-size", "5"], 2, "--val-size"),
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
    "lr below the default min-lr": (["--lr", "1e-7", "--scheduler", "cosine"], 2, "--min-lr"),
    "warmup longer than run": (["--warmup-epochs", "5", "--epochs", "3"], 2, "--warmup-epochs"),
    "onecycle with warmup": (["--scheduler", "onecycle", "--warmup-epochs", "1"], 2, "--warmup-epochs"),
    "arch kwargs not JSON": (["--from-scratch", "--arch-kwargs", "{blocks: 1}"], 2, "--arch-kwargs"),
    "arch kwargs a list": (["--from-scratch", "--arch-kwargs", "[1]"], 2, "--arch-kwargs"),
    "arch kwargs unknown name": (["--from-scratch", "--arch-kwargs", '{"depth": 3}'], 2, "unexpected keyword"),
    "arch kwargs for a checkpoint": (["--arch-kwargs", '{"hidden": 8}'], 2, "only with --from-scratch"),
    "freeze-conv from scratch": (["--freeze-conv", "--from-scratch"], 2, "--freeze-conv"),
    "lr beyond float32": (["--lr", "1e39"], 2, "--lr: must be a finite number"),
    "11 classes": (["--from-scratch", "--arch-kwargs", '{"num_classes": 11}'], 2, "10 scores per image"),
    "resnet with 20 classes": (["--from-scratch", "--arch", "resnet", "--arch-kwargs", '{"num_classes": 20}'], 2,
                               "shape (2, 20)"),
    "zero width": (["--from-scratch", "--arch-kwargs", '{"channels": [0, 8, 8]}'], 2, "channels must be"),
    "float head": (["--from-scratch", "--arch-kwargs", '{"hidden": 2.5}'], 2, "hidden must be a whole number"),
    "text dropout": (["--from-scratch", "--arch-kwargs", '{"dropout": "x"}'], 2, "dropout must be a number"),
    "a 261 M parameter model": (["--from-scratch", "--arch-kwargs", '{"hidden": 150000}'], 2,
                                "261,058,474 parameters"),
    "arch without from-scratch": (["--arch", "resnet"], 2, "--arch: only with --from-scratch"),
    "preset from scratch with a model": (["--preset", "resnet20", "--model-path", "input.pt"], 2,
                                         "--model-path and --from-scratch (set by --preset resnet20)"),
    "preset head from scratch": (["--preset", "head", "--from-scratch"], 2,
                                 "--freeze-conv (set by --preset head) and --from-scratch"),
    "sync-bn on cpu": (["--sync-bn"], 2, "--sync-bn"),
    "missing model": (["--model-path", "missing.pt"], 1, "checkpoint not found: missing.pt"),
    "missing data": (["--data-dir", "no_such_folder"], 1, "not found"),
    "output is the input": (["--output", "input.pt"], 2, "--output"),
    "output exists": (["--output", "existing/best.pt"], 2, "--overwrite"),
    "output under a file": (["--output", "input.pt/best.pt"], 2, "--output"),
    "resume from a best model": (["--resume", "input.pt"], 1, "not a resumable checkpoint"),
    "NaN weights": (["--model-path", "nan.pt"], 1, "NaN/Inf weights in classifier.5.bias"),
    "newer checkpoint format": (["--model-path", "future.pt"], 1, "format version 99 is newer"),
    "normalize std tiny": (["--normalize", "0", "1e-40"], 2, "--normalize: must be"),
    "normalize mean huge": (["--normalize", "1e300", "1"], 2, "--normalize: must be"),
    "model-def empty": (["--model-def", ""], 2, "--model-def: expected"),
    "logdir empty": (["--logdir", ""], 2, "--logdir: expected a folder"),
    "trainable empty": (["--trainable", ""], 2, "--trainable: expected"),
    "trainable only commas": (["--trainable", ",,"], 2, "--trainable: expected"),
    "trainable only spaces": (["--trainable", " , "], 2, "--trainable: expected"),
    "trainable matching nothing": (["--trainable", "fc*"], 2, "--trainable 'fc*' matches no layer"),
    "trainable unclosed bracket": (["--trainable", "["], 2, "--trainable '[' matches no layer"),
}

TEST_MODEL_CASES = {
    "batches zero": (["--batches", "0"], 2, "--batches"),
    "batches negative": (["--batches", "-1"], 2, "--batches"),
    "batch size not a number": (["--batch-size", "x"], 2, "--batch-size"),
    "cuda without a GPU": (["--device", "cuda"], 2, "--device"),
    "unknown amp": (["--amp", "fp8"], 2, "--amp"),
    "min-accuracy as a percentage": (["--min-accuracy", "90"], 2, "--min-accuracy"),
    "normalize std tiny": (["--normalize", "0", "1e-40"], 2, "--normalize: must be"),
    "normalize mean huge": (["--normalize", "1e300", "1"], 2, "--normalize: must be"),
    "model-def empty": (["--model-def", ""], 2, "--model-def"),
}


def snapshot(folder):
    """Every file and folder under `folder`, with each file's bytes."""
    return {p: p.read_bytes() if p.is_file() else None for p in sorted(folder.rglob("*"))}


@pytest.fixture
def workdir(tmp_path, monkeypatch):
    """A folder with input.pt (the shipped model), an earlier run's existing/best.pt, and the shipped model with a
    NaN weight (nan.pt) and from a newer format (future.pt); the scripts run inside it."""
    shutil.copy(REPO / "model" / "mnist_cnn3.pt", tmp_path / "input.pt")
    (tmp_path / "existing").mkdir()
    shutil.copy(REPO / "model" / "mnist_cnn3.pt", tmp_path / "existing" / "best.pt")
    ckpt = torch.load(tmp_path / "input.pt", weights_only=True)
    torch.save({**ckpt, "format_version": 99}, tmp_path / "future.pt")
    ckpt["model"]["classifier.5.bias"][0] = float("nan")
    torch.save(ckpt, tmp_path / "nan.pt")
    monkeypatch.chdir(tmp_path)
    return tmp_path


def refused(main, argv, capsys):
    """A script's main(argv) run in-process, as the command line would (argparse exits with SystemExit): its
    exit code and stderr, once checked that it shows no traceback and left the current folder as it was."""
    before = snapshot(Path.cwd())
    try:
        code = main(argv)
    except SystemExit as exc:
        code = exc.code
    err = capsys.readouterr().err
    assert "Traceback" not in err and snapshot(Path.cwd()) == before, err
    return code, err


@pytest.mark.parametrize("case", list(FINETUNE_CASES))
def test_finetune_bad_input(case, workdir, small_data_dir, capsys):
    extra, expected_code, expected_text = FINETUNE_CASES[case]
    model = [] if "--from-scratch" in extra else ["--model-path", "input.pt"]  # random weights read none
    argv = [*model, "--data-dir", str(small_data_dir), "--output", "out/best.pt", "--logdir", "tb", "--val-size", "500",
            "--batch-size", "64", "--device", "cpu", "--epochs", "1", "--quiet", *extra]  # the last of a flag wins
    code, err = refused(finetune_gpu.main, argv, capsys)
    assert code == expected_code and expected_text in err, err
    assert err.strip().splitlines()[-1].startswith(("error:", "finetune_gpu.py: error:"))


@pytest.mark.parametrize("case", list(TEST_MODEL_CASES))
def test_test_model_bad_input(case, workdir, small_data_dir, capsys):
    extra, expected_code, expected_text = TEST_MODEL_CASES[case]
    argv = ["--model-path", "input.pt", "--data-dir", str(small_data_dir), *extra]
    code, err = refused(test_model.main, argv, capsys)
    assert code == expected_code and expected_text in err, err


@pytest.mark.slow
def test_a_preset_may_not_change_a_fixed_field_on_resume(workdir, small_data_dir, trained_checkpoint, capsys):
    first = run_script("finetune_gpu.py", "--model-path", trained_checkpoint, "--data-dir", small_data_dir, "--output",
                       "run/best.pt", "--logdir", "tb", "--epochs", "1", "--limit-train", "256", "--val-size", "500",
                       "--batch-size", "64", "--device", "cpu", "--quiet", cwd=workdir)
    assert first.returncode == 0, first.stderr
    code, err = refused(finetune_gpu.main, ["--resume", "run/last.pt", "--preset", "head", "--override-resume"], capsys)
    assert code == 2 and "--freeze-conv cannot change" in err, err


def test_a_failed_download_is_one_line_and_leaves_no_folders(workdir, monkeypatch, capsys):
    import torchvision.datasets

    class Offline:
        def __init__(self, root, train, download):
            (Path(root) / "FashionMNIST" / "raw").mkdir(parents=True)  # what torchvision creates first
            raise RuntimeError("Error downloading train-images-idx3-ubyte.gz:\nTried https://...\nmore lines")

    monkeypatch.setattr(torchvision.datasets, "FashionMNIST", Offline)
    monkeypatch.delenv("FASHION_MNIST_DIR", raising=False)
    code, err = refused(finetune_gpu.main, ["--model-path", "input.pt", "--data-dir", "fresh/data", "--download",
                                            "--output", "out/best.pt", "--logdir", "tb", "--device", "cpu"], capsys)
    assert code == 1 and err.startswith("error: --download:") and "Error downloading" in err and err.count("\n") == 1


BAD_DATA = {  # what is done to the training images file of a good split
    "no images": lambda path: write_split(path.parent, "train", np.zeros((0, 28, 28), np.uint8), np.zeros(0, np.uint8)),
    "truncated": lambda path: path.write_bytes(path.read_bytes()[:-100]),
    "labels in its place": lambda path: write_idx(path, np.zeros(20, np.uint8), LABELS_MAGIC),
    "a folder in its place": lambda path: (path.unlink(), path.mkdir()),
    # 20 images promised, 10 MB of zeros behind them
    "a gzip bomb": lambda path: (path.unlink(), Path(f"{path}.gz").write_bytes(
        gzip.compress(struct.pack(">4I", IMAGES_MAGIC, 20, 28, 28) + bytes(10**7), 1))),
}


@pytest.mark.parametrize("case", BAD_DATA)
def test_a_bad_data_file_is_one_line_naming_the_file_not_a_flag(case, workdir, capsys):
    for split in ("train", "test"):
        write_split(workdir / "d", split, np.zeros((20, 28, 28), np.uint8), np.arange(20, dtype=np.uint8) % 10)
    BAD_DATA[case](workdir / "d" / FILES["train"][0])
    code, err = refused(finetune_gpu.main, ["--model-path", "input.pt", "--data-dir", "d", "--output", "out/best.pt",
                                            "--device", "cpu"], capsys)
    assert code == 1 and err.startswith("error:") and err.count("\n") == 1 and FILES["train"][0] in err, err
    assert "--val-size" not in err


def test_resume_never_unpickles_and_says_so(workdir, capsys):
    torch.save(torch.nn.Linear(2, 2), "whole.pt")  # a pickled module: loading it would run code
    code, err = refused(finetune_gpu.main, ["--resume", "whole.pt", "--trust-pickle"], capsys)
    assert code == 1 and "--resume never unpickles" in err and "pass --trust-pickle" not in err, err

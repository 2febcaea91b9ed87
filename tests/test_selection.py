"""The starting model is the first candidate (epoch 0), the validation split travels with the model,
and the specification's second round runs as written."""

import json
import shutil

import pytest
import torch
from conftest import SMALL_RUN, finetune, load, run_script

from fashion_ft.data import Split, choose_split


@pytest.mark.slow
def test_a_run_that_cannot_beat_its_input_keeps_the_input(tmp_path, small_data_dir, trained_checkpoint):
    """And the training seed does not move the validation split: another --seed validates epoch 0 alike."""
    # a learning rate this large wrecks the weights in one epoch: no epoch can beat the starting model
    result, out = finetune(tmp_path, small_data_dir, trained_checkpoint, "--epochs", 2, "--lr", 0.1, limit_train=256)
    assert result.returncode == 0, result.stderr
    assert "no epoch beat the starting model; it was kept" in result.stdout
    other_seed, other = finetune(tmp_path, small_data_dir, trained_checkpoint, "--epochs", 1, "--seed", 7, name="b",
                                 limit_train=256)
    assert other_seed.returncode == 0 and "warning" not in other_seed.stderr, other_seed.stderr  # its own split
    best, start = load(out / "best.pt"), load(trained_checkpoint)
    assert all(torch.equal(best["model"][k], start["model"][k]) for k in start["model"])
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["best_epoch"] == 0 and metrics["finished"] is True
    assert [row["epoch"] for row in metrics["history"]] == [0, 1, 2]
    assert json.loads((other / "metrics.json").read_text())["history"][0] == metrics["history"][0]
    assert best["split"]["seed"] == 42 and best["config"]["split_seed"] == 42
    check = run_script("test_model.py", "--model-path", out / "best.pt", "--data-dir", small_data_dir,
                       "--full", "--json")
    original = run_script("test_model.py", "--model-path", trained_checkpoint, "--data-dir", small_data_dir,
                          "--full", "--json")
    accuracy = [next(c for c in json.loads(r.stdout)["checks"] if c["name"] == "quick eval")["data"]["accuracy"]
                for r in (check, original)]
    assert accuracy[0] == accuracy[1] == pytest.approx(metrics["test_acc"])


@pytest.mark.slow
def test_a_model_with_no_split_record_validates_on_half_the_test_images(tmp_path, small_data_dir, trained_checkpoint):
    """It may have trained on every training image: selection on one half of the test images, the test on
    the other half, all of it recorded; a second round from its best model validates the same way."""
    bare = tmp_path / "bare.pt"
    torch.save(load(trained_checkpoint)["model"], bare)

    def finetune(model_path, *args, name):  # without SMALL_RUN's --val-size, which names a training split
        out = tmp_path / name
        return run_script("finetune_gpu.py", "--model-path", model_path, "--data-dir", small_data_dir, "--output",
                          out / "best.pt", "--logdir", tmp_path / "tb", "--limit-train", 256, "--epochs", 1,
                          "--batch-size", 64, "--device", "cpu", *args), out

    result, out = finetune(bare, name="a")
    assert result.returncode == 0, result.stderr
    assert result.stderr.strip().splitlines() == [
        f"warning: {bare} has no record of its training split, so it may have trained on every training image: "
        "this run validates on half of the test images, split seed 42; the other half is the test (--val-from "
        "train: validate on training images)"]
    assert "256 train, 500 validation (half of the test images" in result.stdout and "500 test images" in result.stdout
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["split"]["validation"] == "test-half" and metrics["test_images"] == 500
    best = load(out / "best.pt")
    assert best["split"]["validation"] == "test-half" and best["config"]["val_from"] == "test-half"
    check = run_script("test_model.py", "--model-path", out / "best.pt", "--data-dir", small_data_dir, "--full",
                       "--json", "--device", "cpu")
    held_out = next(c for c in json.loads(check.stdout)["checks"] if c["name"] == "held-out half")["data"]
    assert held_out == {"images": 500, "accuracy": pytest.approx(metrics["test_acc"])}
    second, out2 = finetune(out / "best.pt", name="b")
    assert second.returncode == 0 and second.stderr == "", second.stderr
    assert load(out2 / "best.pt")["split"] == {**best["split"]}
    back, _ = finetune(out / "best.pt", "--val-from", "train", name="c")
    assert "was trained on every training image" in back.stderr
    refused, _ = finetune(bare, "--val-from", "test-half", "--val-size", 500, name="d")
    assert refused.returncode == 2 and "--val-size: with --val-from test-half" in refused.stderr


def ask(seed=None, val_size=None, fingerprint="f", val_from=None):
    """What the user asked for (None: not given) on the data of `fingerprint`."""
    return Split(seed, val_size, fingerprint, val_from)


RECORD = Split(3, 700, "f")
SPLIT_CHOICES = [  # (asked, the starting model's record, the split chosen, what its one warning says; None: none)
    (ask(), RECORD, RECORD, None),
    (ask(val_size=800), RECORD, Split(3, 800, "f"), "trained with split seed 3, 700 validation images, this run "
                                                    "uses split seed 3, 800 validation images"),
    (ask(seed=7), RECORD, Split(7, 700, "f"), "split seed 7"),
    (ask(fingerprint="xyz"), RECORD, Split(3, 700, "xyz"), "other training files"),
    (ask(val_size=1000), Split(42, 5000, "f"), Split(42, 1000, "f"), None),  # inside the recorded ones
    (ask(7, 1000), Split(42, 5000, "f"), Split(7, 1000, "f"), "split seed 7"),  # another seed: other images
    # where the validation images come from: --val-size says "I know its split"
    (ask(), None, Split(42, 5000, "f", "test-half"), "may have trained on every training image"),
    (ask(val_size=1000), None, Split(42, 1000, "f"), "no record of its validation split"),
    (ask(val_from="train"), None, Split(42, 5000, "f"), "no record of its validation split"),
    (ask(val_from="test-half"), RECORD, Split(3, 700, "f", "test-half"), None),
    (ask(), Split(3, 700, "f", "test-half"), Split(3, 700, "f", "test-half"), None),
    (ask(val_from="train"), Split(3, 700, "f", "test-half"), RECORD, "was trained on every training image"),
]


@pytest.mark.parametrize("asked, record, chosen, warning", SPLIT_CHOICES)
def test_choose_split(asked, record, chosen, warning):
    split, warnings = choose_split(asked, record, "m.pt", torch.arange(10).repeat(600))
    assert split == chosen
    assert (warnings == []) if warning is None else (len(warnings) == 1 and warning in warnings[0]), warnings
    assert "\n" not in "".join(warnings)
    assert choose_split(asked, record, None)[1] == []  # random weights: nothing to warn of


def test_random_weights_take_the_default_split():
    assert choose_split(ask(), None, None) == (Split(42, 5000, "f"), [])


@pytest.mark.slow
def test_second_round_as_the_specification_writes_it(tmp_path, small_data_dir, trained_checkpoint):
    """`--model-path=result/mnist_cnn_finetuned.pt` with the default output: the run moves aside."""
    (tmp_path / "result").mkdir()
    shutil.copy(trained_checkpoint, tmp_path / "result" / "mnist_cnn_finetuned.pt")
    before = (tmp_path / "result" / "mnist_cnn_finetuned.pt").read_bytes()
    argv = ["--model-path=result/mnist_cnn_finetuned.pt", "--lr=0.0005", "--epochs=1", "--scheduler=cosine",
            f"--data-dir={small_data_dir}", "--limit-train=256", *SMALL_RUN]
    result = run_script("finetune_gpu.py", *argv, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "output: result/round2/mnist_cnn_finetuned.pt" in result.stdout
    assert (tmp_path / "result" / "round2" / "metrics.json").exists()
    assert (tmp_path / "result" / "mnist_cnn_finetuned.pt").read_bytes() == before
    explicit = run_script("finetune_gpu.py", *argv, "--output=result/mnist_cnn_finetuned.pt", cwd=tmp_path)
    assert explicit.returncode == 2
    assert "--output result/round3/mnist_cnn_finetuned.pt" in explicit.stderr

"""The shipped base models are the files their model cards describe, and they measure what the cards say."""

import hashlib
import json
import re

import pytest
from conftest import REPO, SMALL_RUN, read_split, run_script

from fashion_ft.checkpoint import load_checkpoint
from fashion_ft.data import Split, choose_split, fingerprint

# file -> (model card, where its test accuracy must lie: cnn3 stands where a user's own model stands,
# the ResNet-20 is the step past what fine-tuning cnn3 reaches)
SHIPPED = {"mnist_cnn3.pt": ("README.md", (90.0, 92.0)), "resnet20.pt": ("resnet20.md", (94.0, 100.0))}


def card_value(model: str, pattern: str) -> str:
    card = (REPO / "model" / SHIPPED[model][0]).read_text()
    match = re.search(pattern, card)
    assert match, f"model/{SHIPPED[model][0]}: {pattern}"
    return match.group(1)


@pytest.mark.parametrize("model", SHIPPED)
def test_sha256_matches_the_model_card(model):
    digest = hashlib.sha256((REPO / "model" / model).read_bytes()).hexdigest()
    assert digest == card_value(model, r"sha256 \| `([0-9a-f]{64})`")


@pytest.mark.slow
@pytest.mark.parametrize("model", SHIPPED)
def test_full_test_set_accuracy_reproduces_the_card(model, real_data_dir):
    card_acc = float(card_value(model, r"test accuracy \| \*\*([0-9.]+)%\*\*"))
    low, high = SHIPPED[model][1]
    assert low <= card_acc <= high
    # The card's figure is exact to the image in fp32 on the CPU, where it was measured; on a GPU, TF32
    # and cuDNN's kernel choice may move an image or two, so the device and precision are pinned.
    result = run_script("test_model.py", "--model-path", f"model/{model}", "--full", "--json",
                        "--data-dir", real_data_dir, "--device", "cpu", "--amp", "off")
    assert result.returncode == 0, result.stdout
    quick_eval = next(c for c in json.loads(result.stdout)["checks"] if c["name"] == "quick eval")["data"]
    assert quick_eval["images"] == 10000 and round(100 * quick_eval["accuracy"], 2) == card_acc


@pytest.mark.slow
def test_resnet_fine_tuning_preset_starts_from_the_shipped_resnet(tmp_path, small_data_dir):
    out = tmp_path / "tune" / "best.pt"
    result = run_script("finetune_gpu.py", "--preset", "resnet20-tune", "--epochs", 1, "--limit-train", 256,
                        "--data-dir", small_data_dir, "--output", out, "--logdir", tmp_path / "tb", *SMALL_RUN,
                        env={"OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stderr
    metrics = json.loads((out.parent / "metrics.json").read_text())
    # epoch 0 is the shipped model, measured before any step: trained, not random weights
    assert metrics["history"][0]["epoch"] == 0 and metrics["base_val_acc"] > 0.85


@pytest.mark.parametrize("model", SHIPPED)
def test_other_training_files_are_warned_about(model, small_data_dir):
    """The split record carries the training files' fingerprint, so a subset of them is told apart."""
    images, labels = read_split(small_data_dir, "train")
    asked = Split(None, None, fingerprint(images, labels))
    _, warnings = choose_split(asked, load_checkpoint(REPO / "model" / model).split, model, labels)
    assert len(warnings) == 1 and "was trained on other training files" in warnings[0]

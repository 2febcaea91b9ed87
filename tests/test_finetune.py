"""finetune_gpu.py end to end on a small real subset: outputs, freezing, schedulers, selection, repeatability."""

import json
import math

import pytest
import torch
from conftest import SMALL_RUN, finetune, load, read_split, run_script, write_split
from test_distributed import torchrun

from fashion_ft.config import Config
from fashion_ft.engine import lr_multiplier

pytestmark = pytest.mark.slow  # every test here runs finetune_gpu.py


def changed_keys(before: dict, after: dict) -> set:
    return {k for k in before if not torch.equal(before[k], after[k])}


@pytest.fixture(scope="module")
def shared(tmp_path_factory, small_data_dir, trained_checkpoint):
    """(result, output folder, metrics.json) of the run most tests here look at: flip TTA, strong augmentation,
    its TensorBoard run named r1 in ../tb."""
    result, out = finetune(tmp_path_factory.mktemp("shared"), small_data_dir, trained_checkpoint, "--epochs", 3,
                           "--lr", 0.003, "--tta", "flip", "--augment", "strong", "--run-name", "r1")
    assert result.returncode == 0, result.stderr
    return result, out, json.loads((out / "metrics.json").read_text())


def test_run_leaves_best_last_and_metrics_and_selects_on_validation_only(shared):
    result, out, metrics = shared
    assert "done (epochs_done)" in result.stdout and "test acc" in result.stdout
    best, last = load(out / "best.pt"), load(out / "last.pt")
    assert best["arch"] == "cnn3" and last["kind"] == "last" and last["epoch"] == 3
    assert best["metrics"]["test_acc"] == pytest.approx(metrics["test_acc"])
    assert 0.5 < metrics["test_acc"] <= 1 and metrics["epochs_run"] == 3
    assert [r["epoch"] for r in best["history"]] == [0, 1, 2, 3] and best["config"]["epochs"] == 3
    assert metrics["finished"] is True and metrics["history"] == last["history"]
    assert list(metrics) == ["started", "device", "amp", "world_size", "global_batch_size", "backend", "split",
                             "stop_reason", "train_s", "best_epoch", "epochs_run", "best_val_loss", "best_val_acc",
                             "base_val_acc", "peak_gpu_mb", "epoch_s", "history", "test_loss", "test_acc",
                             "test_images", "per_class_test_acc", "finished"]
    assert not list(out.glob("*.tmp")) and not list(out.glob(".*"))
    best_by_val = max(last["history"], key=lambda r: (r["val_acc"], -r["epoch"]))["epoch"]
    assert metrics["best_epoch"] == best_by_val == best["metrics"]["epoch"]
    assert all("test_acc" not in row for row in last["history"])  # the test set is not looked at per epoch


def test_tensorboard_run_has_scalars_images_and_hparams(shared):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(shared[1].parent / "tb" / "r1"), size_guidance={"images": 0}).Reload()
    tags = events.Tags()
    assert {"train/loss", "train/acc", "val/loss", "val/acc", "lr", "throughput/train_images_per_s",
            "hparam/test_acc", "test_per_class/Ankle_boot"} <= set(tags["scalars"]), tags["scalars"]
    assert [e.step for e in events.Scalars("val/acc")] == [0, 1, 2, 3]  # 0: the starting model
    assert {"test/confusion_matrix", "test/per_class_accuracy", "test/misclassified"} <= set(tags["images"])
    assert events.Images("test/confusion_matrix")[0].width > 400
    assert "config/text_summary" in tags["tensors"]
    assert "_hparams_/session_start_info" in events.PluginTagToContent("hparams")


def test_flip_tta_is_used_for_selection_and_test_and_test_model_reproduces_it(shared, small_data_dir):
    _, out, metrics = shared
    assert load(out / "best.pt")["config"]["tta"] == "flip"
    accuracy, loss = {}, {}
    for tta in ("flip", "none"):
        check = run_script("test_model.py", "--model-path", out / "best.pt", "--data-dir", small_data_dir,
                           "--full", "--json", "--tta", tta)
        assert check.returncode == 0, check.stdout + check.stderr
        quick_eval = next(c for c in json.loads(check.stdout)["checks"] if c["name"] == "quick eval")["data"]
        assert quick_eval["tta"] == tta
        accuracy[tta], loss[tta] = quick_eval["accuracy"], quick_eval["loss"]
    assert accuracy["flip"] == pytest.approx(metrics["test_acc"], abs=1e-6)
    assert loss["none"] != loss["flip"]  # the flag really changes the predictions


def test_output_feeds_a_second_round_and_passes_test_model(shared, tmp_path, small_data_dir):
    first = shared[1] / "best.pt"
    second, out = finetune(tmp_path, small_data_dir, first, "--epochs", 1, "--lr", 0.0005)
    assert second.returncode == 0, second.stderr
    assert load(out / "best.pt")["config"]["model_path"] == str(first)
    check = run_script("test_model.py", "--model-path", out / "best.pt", "--data-dir", small_data_dir)
    assert check.returncode == 0 and "all" in check.stdout and "checks passed" in check.stdout


@pytest.mark.parametrize("flag, frozen, trained", [  # the prefixes it keeps bit-identical, tensors it trains
    ("--freeze-conv", ("features.",), {"classifier.2.weight", "classifier.5.weight"}),
    ("--freeze-bn", ("features.1.", "features.5.", "features.9."),
     {"features.0.weight", "features.4.weight", "classifier.2.weight"}),
])
def test_freezing_keeps_weights_and_batchnorm_statistics_bit_identical(flag, frozen, trained, tmp_path, small_data_dir,
                                                                        trained_checkpoint):
    result, out = finetune(tmp_path, small_data_dir, trained_checkpoint, "--epochs", 1, flag, "--lr", 0.01)
    assert result.returncode == 0, result.stderr
    before = load(trained_checkpoint)["model"]
    assert any(k.startswith(frozen) and k.endswith("running_mean") for k in before)  # BatchNorm2d among them
    changed = changed_keys(before, load(out / "last.pt")["model"])
    assert not {k for k in changed if k.startswith(frozen)} and trained <= changed


def test_the_cosine_lr_curve_and_a_new_lr_on_resume_at_its_place_in_the_schedule(tmp_path, small_data_dir,
                                                                                   trained_checkpoint):
    """The history records the LR each epoch started with (every scheduler's curve: tests/test_engine.py)."""
    result, out = finetune(tmp_path, small_data_dir, trained_checkpoint, "--epochs", 2, "--min-lr", 0,
                           "--warmup-epochs", 0, limit_train=256)
    assert result.returncode == 0, result.stderr
    more = run_script("finetune_gpu.py", "--resume", out / "last.pt", "--epochs", 4, "--lr", 0.002,
                      "--override-resume", "--quiet")
    assert more.returncode == 0, more.stderr
    steps = 256 // 64
    factor = lr_multiplier(Config(epochs=4, lr=0.002, min_lr=0.0, scheduler="cosine"), steps)
    assert [row["lr"] for row in load(out / "last.pt")["history"][1:]] == pytest.approx(
        [1e-3, 0.5e-3, 0.002 * factor(2 * steps), 0.002 * factor(3 * steps)])  # 0.5e-3: halfway through 2 epochs


def test_plateau_halves_the_lr_and_early_stopping_ends_the_run(tmp_path, small_data_dir, trained_checkpoint):
    # A min-delta no change can beat. The plateau scheduler counts the first epoch as its best and halves the
    # LR after each later one; early stopping counts from the starting model (epoch 0) and stops after 3.
    result, out = finetune(tmp_path, small_data_dir, trained_checkpoint, "--epochs", 10, "--scheduler", "plateau",
                           "--plateau-patience", 0, "--plateau-factor", 0.5, "--monitor", "val_loss", "--min-delta", 9,
                           "--patience", 3, "--warmup-epochs", 0, limit_train=256)
    assert result.returncode == 0, result.stderr
    metrics, last = json.loads((out / "metrics.json").read_text()), load(out / "last.pt")
    assert metrics["stop_reason"] == "early_stopping" and metrics["epochs_run"] == 3
    assert last["early_stopping"]["best_epoch"] == 0
    assert [row["lr"] for row in last["history"][1:]] == pytest.approx([1e-3, 1e-3, 5e-4])


def test_lr_multiplier_warmup_then_cosine():
    cfg = Config(epochs=10, warmup_epochs=2, scheduler="cosine", min_lr=0.0)
    factor = lr_multiplier(cfg, steps_per_epoch=10)
    assert factor(0) == pytest.approx(0.05) and factor(19) == pytest.approx(1.0)
    assert factor(20) == pytest.approx(1.0) and factor(60) == pytest.approx(0.5)
    assert factor(99) == pytest.approx(0.5 * (1 + math.cos(math.pi * 79 / 80)))


def test_same_seed_same_results_and_the_ema_weights_are_the_ones_validated_and_saved(tmp_path, small_data_dir):
    outs = [tmp_path / name for name in ("a", "b")]
    for out in outs:  # from scratch there is no epoch 0, so epoch 1, the moving average, is the best model
        result = run_script("finetune_gpu.py", "--from-scratch", "--seed", 7, "--optimizer", "sgd", "--lr", 0.05,
                            "--ema-decay", 0.9, "--augment", "strong", "--epochs", 1, "--data-dir", small_data_dir,
                            "--output", out / "best.pt", "--logdir", tmp_path / "tb", *SMALL_RUN, "--limit-train", 512)
        assert result.returncode == 0, result.stderr
        assert "base model" not in result.stdout
    best, last, again = load(outs[0] / "best.pt"), load(outs[0] / "last.pt"), load(outs[1] / "best.pt")
    assert best["config"]["optimizer"] == "sgd"
    assert not changed_keys(best["model"], again["model"])  # the random init is seeded too
    first, second = (json.loads((out / "metrics.json").read_text()) for out in outs)
    assert (first["test_acc"], first["best_val_loss"]) == (second["test_acc"], second["best_val_loss"])
    averaged = {k.removeprefix("module."): v for k, v in last["ema"].items() if k.startswith("module.")}
    assert averaged.keys() == best["model"].keys() and not changed_keys(averaged, best["model"])
    assert not torch.equal(best["model"]["classifier.2.weight"], last["model"]["classifier.2.weight"])


def test_memory_layout_does_not_change_the_numbers(tmp_path, small_data_dir, trained_checkpoint):
    runs = {}
    for layout in ("--channels-last", "--no-channels-last"):
        result, out = finetune(tmp_path, small_data_dir, trained_checkpoint, "--epochs", 1, "--amp", "off", layout,
                               name=layout.strip("-"), limit_train=256)
        assert result.returncode == 0, result.stderr
        runs[layout] = load(out / "last.pt")
        assert runs[layout]["config"]["channels_last"] == (layout == "--channels-last")
    # the same arithmetic in another order: the losses agree, weights only to within Adam's sign noise
    a, b = ((runs[k]["history"][1]["train_loss"], runs[k]["history"][1]["val_loss"]) for k in runs)
    assert a == pytest.approx(b, rel=1e-3)


def test_scale_lr_multiplies_by_the_number_of_processes(tmp_path, small_data_dir, trained_checkpoint):
    out = tmp_path / "ddp"
    result = torchrun("--model-path", trained_checkpoint, "--data-dir", small_data_dir, "--output", out / "best.pt",
                      "--logdir", tmp_path / "tb", "--limit-train", 512, "--epochs", 1, "--scale-lr", "--scheduler",
                      "none", "--warmup-epochs", "0", *SMALL_RUN, env={"OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stderr
    assert load(out / "last.pt")["history"][1]["lr"] == pytest.approx(0.002)


def test_a_training_set_of_one_class_is_warned_about(tmp_path, small_data_dir, trained_checkpoint):
    images, labels = read_split(small_data_dir, "train")
    write_split(tmp_path / "trousers", "train", images[labels == 1].numpy(), labels[labels == 1].numpy())
    write_split(tmp_path / "trousers", "test", *read_split(small_data_dir, "test"))
    result, _ = finetune(tmp_path, tmp_path / "trousers", trained_checkpoint, "--epochs", 1, "--val-size", 50,
                         limit_train=128)
    assert result.returncode == 0, result.stderr
    assert "the training images hold only 1 of the 10 classes (Trouser)" in result.stderr

"""finetune_gpu.py end to end on a small real subset: outputs, freezing, schedulers, selection, repeatability."""

import json
import math
import os
import subprocess
import sys

import pytest
import torch
from conftest import REPO, SMALL_RUN, finetune, run_script

from fashion_ft.config import Config
from fashion_ft.engine import lr_multiplier

pytestmark = pytest.mark.slow  # every test here runs finetune_gpu.py


def load(path):
    return torch.load(path, map_location="cpu", weights_only=True)


def test_run_leaves_best_last_metrics_and_tensorboard(tmp_path, small_data_dir, trained_checkpoint):
    result, out = finetune(tmp_path, small_data_dir, trained_checkpoint, "--epochs", 2, "--run-name", "r1")
    assert result.returncode == 0, result.stderr
    assert "done (epochs_done)" in result.stdout and "test acc" in result.stdout
    best, last = load(out / "best.pt"), load(out / "last.pt")
    metrics = json.loads((out / "metrics.json").read_text())
    assert best["arch"] == "cnn3" and last["kind"] == "last" and last["epoch"] == 2
    assert best["metrics"]["test_acc"] == pytest.approx(metrics["test_acc"])
    assert 0.5 < metrics["test_acc"] <= 1 and metrics["epochs_run"] == 2
    assert [r["epoch"] for r in best["history"]] == [0, 1, 2] and best["config"]["epochs"] == 2
    assert metrics["finished"] is True and metrics["history"] == last["history"]
    assert list(metrics) == ["started", "device", "amp", "world_size", "global_batch_size", "backend", "split",
                             "stop_reason", "train_s", "best_epoch", "epochs_run", "best_val_loss", "best_val_acc",
                             "base_val_acc", "peak_gpu_mb", "epoch_s", "history", "test_loss", "test_acc",
                             "test_images", "per_class_test_acc", "finished"]
    assert (tmp_path / "tb" / "r1").is_dir()
    assert not list(out.glob("*.tmp")) and not list(out.glob(".*"))


def test_output_feeds_a_second_round_and_passes_test_model(tmp_path, small_data_dir, trained_checkpoint):
    first, out1 = finetune(tmp_path, small_data_dir, trained_checkpoint, "--epochs", 1, name="round1")
    assert first.returncode == 0, first.stderr
    second, out2 = finetune(tmp_path, small_data_dir, out1 / "best.pt", "--epochs", 1, "--lr", 0.0005,
                            name="round2")
    assert second.returncode == 0, second.stderr
    assert load(out2 / "best.pt")["config"]["model_path"] == str(out1 / "best.pt")
    check = run_script("test_model.py", "--model-path", out2 / "best.pt", "--data-dir", small_data_dir)
    assert check.returncode == 0 and "all" in check.stdout and "checks passed" in check.stdout


def changed_keys(before: dict, after: dict) -> set:
    return {k for k in before if not torch.equal(before[k], after[k])}


def test_freeze_conv_keeps_features_bit_identical(tmp_path, small_data_dir, trained_checkpoint):
    result, out = finetune(tmp_path, small_data_dir, trained_checkpoint, "--epochs", 1, "--freeze-conv",
                           "--monitor", "val_loss", "--lr", 0.01)
    assert result.returncode == 0, result.stderr
    before, after = load(trained_checkpoint)["model"], load(out / "last.pt")["model"]
    changed = changed_keys(before, after)
    assert not {k for k in changed if k.startswith("features.")}  # conv weights and BN statistics
    assert {"classifier.2.weight", "classifier.5.weight"} <= changed


def test_freeze_bn_keeps_batchnorm_bit_identical(tmp_path, small_data_dir, trained_checkpoint):
    result, out = finetune(tmp_path, small_data_dir, trained_checkpoint, "--epochs", 1, "--freeze-bn",
                           "--lr", 0.01)
    assert result.returncode == 0, result.stderr
    before, after = load(trained_checkpoint)["model"], load(out / "last.pt")["model"]
    bn_keys = {k for k in before if k.startswith(("features.1.", "features.5.", "features.9."))}  # BatchNorm2d
    assert any(k.endswith("running_mean") for k in bn_keys)
    changed = changed_keys(before, after)
    assert not changed & bn_keys
    assert {"features.0.weight", "features.4.weight", "classifier.2.weight"} <= changed


LR_CASES = {  # the wiring through a real run: the default, and plateau, which reads the validation loss
    "cosine": ["--min-lr", "0"],
    "plateau": ["--plateau-patience", "0", "--plateau-factor", "0.5", "--monitor", "val_loss", "--min-delta", "9"],
}


@pytest.mark.parametrize("scheduler", list(LR_CASES))
def test_a_run_records_the_lr_curve_of_its_scheduler(tmp_path, small_data_dir, trained_checkpoint, scheduler):
    """Every scheduler's curve is checked in tests/test_engine.py; here the run's history records it."""
    result, out = finetune(tmp_path, small_data_dir, trained_checkpoint, "--epochs", 4, "--scheduler", scheduler,
                           "--patience", 10, "--limit-train", 256, "--warmup-epochs", 0, *LR_CASES[scheduler])
    assert result.returncode == 0, result.stderr
    lrs = [row["lr"] for row in load(out / "last.pt")["history"][1:]]  # the LR each epoch started with
    if scheduler == "cosine":
        assert len(lrs) == 4 and lrs[0] == pytest.approx(1e-3) and all(a > b for a, b in zip(lrs, lrs[1:]))
        assert lrs[2] == pytest.approx(0.5e-3, rel=1e-3)  # halfway through the cosine
    else:  # min-delta 9 means no epoch after the first improves: halve every epoch
        assert lrs == pytest.approx([1e-3, 1e-3, 5e-4, 2.5e-4])


def test_lr_multiplier_warmup_then_cosine():
    cfg = Config(epochs=10, warmup_epochs=2, scheduler="cosine", min_lr=0.0)
    factor = lr_multiplier(cfg, steps_per_epoch=10)
    assert factor(0) == pytest.approx(0.05) and factor(19) == pytest.approx(1.0)
    assert factor(20) == pytest.approx(1.0) and factor(60) == pytest.approx(0.5)
    assert factor(99) == pytest.approx(0.5 * (1 + math.cos(math.pi * 79 / 80)))


def test_early_stopping_triggers(tmp_path, small_data_dir, trained_checkpoint):
    # a min-delta no change can beat: every epoch after the starting model (epoch 0) is "no improvement"
    result, out = finetune(tmp_path, small_data_dir, trained_checkpoint, "--epochs", 10, "--patience", 2,
                           "--monitor", "val_loss", "--min-delta", 100, "--limit-train", 256)
    assert result.returncode == 0, result.stderr
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["stop_reason"] == "early_stopping"
    assert metrics["epochs_run"] == 2 and load(out / "last.pt")["early_stopping"]["best_epoch"] == 0


def test_best_model_is_selected_on_validation_only(tmp_path, small_data_dir, trained_checkpoint):
    result, out = finetune(tmp_path, small_data_dir, trained_checkpoint, "--epochs", 4, "--lr", 0.003)
    assert result.returncode == 0, result.stderr
    history = load(out / "last.pt")["history"]
    best_by_val = max(history, key=lambda r: (r["val_acc"], -r["epoch"]))["epoch"]
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["best_epoch"] == best_by_val
    assert load(out / "best.pt")["metrics"]["epoch"] == best_by_val
    assert all("test_acc" not in row for row in history)  # the test set is not looked at per epoch


def test_same_seed_same_results(tmp_path, small_data_dir, trained_checkpoint):
    runs = [finetune(tmp_path, small_data_dir, trained_checkpoint, "--epochs", 2, "--seed", 7, name=n)
            for n in ("a", "b")]
    assert all(r.returncode == 0 for r, _ in runs)
    (_, a), (_, b) = runs
    assert not changed_keys(load(a / "best.pt")["model"], load(b / "best.pt")["model"])
    ma, mb = (json.loads((o / "metrics.json").read_text()) for o in (a, b))
    assert (ma["test_acc"], ma["best_val_loss"]) == (mb["test_acc"], mb["best_val_loss"])


def test_from_scratch_with_sgd_is_repeatable(tmp_path, small_data_dir):
    outs = [tmp_path / name for name in ("a", "b")]
    for out in outs:
        result = run_script("finetune_gpu.py", "--from-scratch", "--optimizer", "sgd", "--lr", 0.05,
                            "--augment", "none", "--epochs", 1, "--limit-train", 512, "--data-dir", small_data_dir,
                            "--output", out / "m.pt", "--logdir", tmp_path / "tb", *SMALL_RUN)
        assert result.returncode == 0, result.stderr
        assert "base model" not in result.stdout
    first, second = (load(out / "m.pt") for out in outs)
    assert first["config"]["optimizer"] == "sgd"
    assert not changed_keys(first["model"], second["model"])  # the random init is seeded too


def test_tensorboard_run_has_scalars_images_and_hparams(tmp_path, small_data_dir, trained_checkpoint):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    result, _ = finetune(tmp_path, small_data_dir, trained_checkpoint, "--epochs", 2, "--run-name", "tb_run")
    assert result.returncode == 0, result.stderr
    events = EventAccumulator(str(tmp_path / "tb" / "tb_run"), size_guidance={"images": 0}).Reload()
    tags = events.Tags()
    for tag in ("train/loss", "train/acc", "val/loss", "val/acc", "lr", "throughput/train_images_per_s",
                "hparam/test_acc", "test_per_class/Ankle_boot"):
        assert tag in tags["scalars"], tag
    assert [e.step for e in events.Scalars("val/acc")] == [0, 1, 2]  # 0: the starting model
    assert {"test/confusion_matrix", "test/per_class_accuracy", "test/misclassified"} <= set(tags["images"])
    assert events.Images("test/confusion_matrix")[0].width > 400
    assert "config/text_summary" in tags["tensors"]
    plugins = events.PluginTagToContent("hparams")
    assert "_hparams_/session_start_info" in plugins


def test_flip_tta_is_used_for_selection_and_test_and_test_model_reproduces_it(tmp_path, small_data_dir,
                                                                               trained_checkpoint):
    result, out = finetune(tmp_path, small_data_dir, trained_checkpoint, "--epochs", 1, "--tta", "flip",
                           "--augment", "strong")
    assert result.returncode == 0, result.stderr
    assert load(out / "best.pt")["config"]["tta"] == "flip"
    reported = json.loads((out / "metrics.json").read_text())["test_acc"]
    accuracy, loss = {}, {}
    for tta in ("flip", "none"):
        check = run_script("test_model.py", "--model-path", out / "best.pt", "--data-dir", small_data_dir,
                           "--full", "--json", "--tta", tta)
        assert check.returncode == 0, check.stdout + check.stderr
        quick_eval = next(c for c in json.loads(check.stdout)["checks"] if c["name"] == "quick eval")
        assert quick_eval["data"]["tta"] == tta
        accuracy[tta], loss[tta] = quick_eval["data"]["accuracy"], quick_eval["data"]["loss"]
    assert accuracy["flip"] == pytest.approx(reported, abs=1e-6)
    assert loss["none"] != loss["flip"]  # the flag really changes the predictions


def test_ema_weights_are_the_ones_validated_and_saved(tmp_path, small_data_dir):
    out = tmp_path / "ema"
    result = run_script("finetune_gpu.py", "--from-scratch", "--ema-decay", 0.9, "--epochs", 1, "--limit-train", 512,
                        "--data-dir", small_data_dir, "--output", out / "best.pt", "--logdir", tmp_path / "tb",
                        *SMALL_RUN)  # from scratch: no epoch 0, so epoch 1 is the best model
    assert result.returncode == 0, result.stderr
    best, last = load(out / "best.pt"), load(out / "last.pt")
    averaged = {k.removeprefix("module."): v for k, v in last["ema"].items() if k.startswith("module.")}
    assert averaged.keys() == best["model"].keys()
    assert all(torch.equal(best["model"][k], averaged[k]) for k in averaged)
    assert not torch.equal(best["model"]["classifier.2.weight"], last["model"]["classifier.2.weight"])


def test_memory_layout_does_not_change_the_numbers(tmp_path, small_data_dir, trained_checkpoint):
    runs = {}
    for layout in ("--channels-last", "--no-channels-last"):
        result, out = finetune(tmp_path, small_data_dir, trained_checkpoint, "--epochs", 1, "--amp", "off",
                               "--limit-train", 256, layout, name=layout.strip("-"))
        assert result.returncode == 0, result.stderr
        runs[layout] = load(out / "last.pt")
        assert runs[layout]["config"]["channels_last"] == (layout == "--channels-last")
    # the same arithmetic in another order: the losses agree, weights only to within Adam's sign noise
    a, b = (runs[k]["history"][1] for k in runs)
    assert a["train_loss"] == pytest.approx(b["train_loss"], rel=1e-3)
    assert a["val_loss"] == pytest.approx(b["val_loss"], rel=1e-3)


def test_a_new_lr_on_resume_keeps_its_place_in_the_cosine_schedule(tmp_path, small_data_dir, trained_checkpoint):
    result, out = finetune(tmp_path, small_data_dir, trained_checkpoint, "--epochs", 2, "--limit-train", 256,
                           "--min-lr", 0, "--warmup-epochs", 0)
    assert result.returncode == 0, result.stderr
    more = run_script("finetune_gpu.py", "--resume", out / "last.pt", "--epochs", 4, "--lr", 0.002,
                      "--override-resume", "--quiet")
    assert more.returncode == 0, more.stderr
    lrs = [row["lr"] for row in load(out / "last.pt")["history"][1:]]
    steps = 256 // 64
    factor = lr_multiplier(Config(epochs=4, lr=0.002, min_lr=0.0, scheduler="cosine"), steps)
    assert lrs[2:] == pytest.approx([0.002 * factor(2 * steps), 0.002 * factor(3 * steps)])


def test_scale_lr_multiplies_by_the_number_of_processes(tmp_path, small_data_dir, trained_checkpoint):
    out = tmp_path / "ddp"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           str(REPO / "finetune_gpu.py"), "--model-path", trained_checkpoint, "--data-dir", small_data_dir,
           "--output", out / "best.pt", "--logdir", tmp_path / "tb", "--limit-train", 512, "--epochs", 1,
           "--scale-lr", "--scheduler", "none", "--warmup-epochs", "0", *SMALL_RUN]
    result = subprocess.run(list(map(str, cmd)), capture_output=True, text=True, timeout=300,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stderr
    assert load(out / "last.pt")["history"][1]["lr"] == pytest.approx(0.002)


def test_a_training_set_of_one_class_is_warned_about(tmp_path, small_data_dir, trained_checkpoint):
    from conftest import read_split, write_split

    images, labels = read_split(small_data_dir, "train")
    one = labels == 1
    write_split(tmp_path / "trousers", "train", images[one].numpy(), labels[one].numpy())
    for name in ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"):
        os.symlink(small_data_dir / name, tmp_path / "trousers" / name)
    result, _ = finetune(tmp_path, tmp_path / "trousers", trained_checkpoint, "--epochs", 1, "--val-size", 50,
                         "--limit-train", 128)
    assert result.returncode == 0, result.stderr
    assert "the training images hold only 1 of the 10 classes (Trouser)" in result.stderr

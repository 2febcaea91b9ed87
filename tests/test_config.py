"""Defaults that depend on the run, resolved once from the command line."""

import pytest

import finetune_gpu
from fashion_ft.config import FINETUNE_WARMUP_EPOCHS


@pytest.mark.parametrize("argv, warmup", [
    ([], FINETUNE_WARMUP_EPOCHS), (["--from-scratch"], 0.0), (["--scheduler", "onecycle"], 0.0),
    (["--warmup-epochs", "2"], 2.0), (["--epochs", "1"], FINETUNE_WARMUP_EPOCHS)])
def test_warmup_is_a_fine_tuning_default(argv, warmup):
    cfg, _ = finetune_gpu.build_config(argv)
    assert cfg.warmup_epochs == warmup


@pytest.mark.parametrize("argv, monitor", [
    ([], "val_loss"), (["--preset", "light"], "val_loss"),
    (["--preset", "deep"], "val_acc"), (["--preset", "deep", "--monitor", "val_loss"], "val_loss")])
def test_label_smoothed_deep_plan_stops_on_accuracy(argv, monitor):
    """Its validation loss is not comparable with the unsmoothed starting model's: a stop on it ended the
    100-epoch plan at epoch 30."""
    cfg, _ = finetune_gpu.build_config(argv)
    assert cfg.monitor == monitor


def test_resnet_presets_train_from_scratch_or_fine_tune_the_shipped_resnet():
    scratch, _ = finetune_gpu.build_config(["--preset", "resnet20"])
    assert (scratch.arch, scratch.from_scratch, scratch.warmup_epochs) == ("resnet", True, 0.0)
    assert scratch.patience >= scratch.epochs  # OneCycle's LR falls only at the end: no stop before it
    tune, _ = finetune_gpu.build_config(["--preset", "resnet20-tune"])
    assert (tune.model_path, tune.from_scratch, tune.warmup_epochs) == ("model/resnet20.pt", False,
                                                                          FINETUNE_WARMUP_EPOCHS)

"""The configuration: defaults that depend on the run, resolved once from the command line, and the values
that validation refuses."""

import re

import pytest

import finetune_gpu
from fashion_ft.config import FINETUNE_WARMUP_EPOCHS, NORMALIZE_RULE, check_normalize, normalize_ok
from fashion_ft.errors import UsageError


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


@pytest.mark.parametrize("mean, std, ok", [
    (0.2860, 0.3530, True), (0.1307, 0.3081, True), (0, 1 / 255, True), (-10, 1e-3, True), (10, 1e6, True),
    (0, 1e-40, False), (0, 0, False), (0, -1, False), (1e300, 1, False), (-10.5, 1, False),
    (float("nan"), 1, False), (0, float("nan"), False), (0, float("inf"), False), (True, 1, False), ("0", 1, False),
])
def test_normalize_bounds(mean, std, ok):
    """The rule the checkpoint loader also applies to a file's record: 1e-40 and 1e300 overflowed later."""
    assert normalize_ok(mean, std) is ok
    if ok:
        check_normalize([mean, std])
    else:
        with pytest.raises(UsageError, match=re.escape(f"--normalize: must be {NORMALIZE_RULE}")):
            check_normalize([mean, std])


@pytest.mark.parametrize("argv", [["--model-def", ""], ["--trainable", ""], ["--trainable", ",,"],
                                  ["--trainable", " , "]])
def test_an_empty_value_is_not_taken_for_a_missing_flag(argv):
    with pytest.raises(UsageError, match=f"^{argv[0]}: expected "):
        finetune_gpu.build_config(argv)

"""The configuration: defaults that depend on the run, resolved once from the command line, the resume
rules, and the values that validation refuses."""

import re

import pytest

import finetune_gpu
from fashion_ft.config import (
    FINETUNE_WARMUP_EPOCHS,
    NORMALIZE_RULE,
    PERMISSIONS,
    Config,
    check_normalize,
    check_resume,
    normalize_ok,
    restored,
)
from fashion_ft.errors import UsageError

WARM = FINETUNE_WARMUP_EPOCHS


@pytest.mark.parametrize("argv, expected", [
    # the warm-up: only when fine-tuning (random weights have nothing to lose; onecycle warms up itself)
    ([], {"warmup_epochs": WARM}), (["--epochs", "1"], {"warmup_epochs": WARM}),
    (["--from-scratch"], {"warmup_epochs": 0.0}), (["--scheduler", "onecycle"], {"warmup_epochs": 0.0}),
    (["--warmup-epochs", "2"], {"warmup_epochs": 2.0}),
    # deep stops on accuracy: label smoothing keeps its validation loss above the starting model's (a stop on it
    # ended the plan at epoch 30); a flag given wins, though it equals its default
    (["--preset", "light"], {"monitor": "val_loss"}), (["--preset", "deep"], {"monitor": "val_acc", "batch_size": 512}),
    (["--preset", "deep", "--monitor", "val_loss", "--lr", "0.001"], {"monitor": "val_loss", "lr": 0.001}),
    # resnet20: OneCycle's LR falls only at the end, so no early stop before it
    (["--preset", "resnet20"], {"arch": "resnet", "from_scratch": True, "warmup_epochs": 0.0, "patience": 70}),
    (["--preset", "resnet20-tune"], {"model_path": "model/resnet20.pt", "from_scratch": False, "warmup_epochs": WARM}),
    (["--preset", "distill", "--kd-alpha", "0.8"], {"teacher": ["model/resnet20.pt"], "kd_alpha": 0.8}),
])
def test_defaults_of_the_run_and_presets_with_the_flags_given_winning(argv, expected):
    cfg, _ = finetune_gpu.build_config(argv)
    assert {name: getattr(cfg, name) for name in expected} == expected


SAVED = Config(lr=0.001, warmup_epochs=0.5)
RESUME_CASES = {  # what the resumed run changes: None (allowed), or what the refusal names
    "epochs (free)": ({"epochs": 40}, False, None),
    "a permission": ({"overwrite": True, "trust_pickle": True, "model_def": "net.py:Net"}, False, None),
    "lr": ({"lr": 0.01}, False, "--lr 0.001 -> 0.01 (pass --override-resume"),
    "lr, overridden": ({"lr": 0.01}, True, None),
    "teacher": ({"teacher": ["t.pt"], "kd_alpha": 0.8}, False, "--teacher None -> ['t.pt'], --kd-alpha 0.5 -> 0.8"),
    "optimizer (fixed)": ({"optimizer": "sgd"}, True, "--optimizer cannot change"),
    "freeze-conv (fixed)": ({"freeze_conv": True, "lr": 0.01}, False, "--freeze-conv cannot change"),
}


@pytest.mark.parametrize("case", list(RESUME_CASES))
def test_resume_rules(case):
    changes, override, refusal = RESUME_CASES[case]
    cfg = Config(**{**SAVED.to_dict(), **changes, "override_resume": override})
    if refusal is None:
        check_resume(SAVED, cfg)
    else:
        with pytest.raises(UsageError, match=re.escape(refusal)):
            check_resume(SAVED, cfg)


def test_resume_restores_all_but_the_permissions():
    """--overwrite given to one run is no licence for the next, nor a record's --model-def code to run."""
    permissions = {name: True for name in PERMISSIONS - {"model_def"}}
    record = {**Config(lr=0.01, model_def="net.py:Net").to_dict(), **permissions}
    cfg = restored({**record, "a field of a later version": 1})
    assert cfg.lr == 0.01 and all(getattr(cfg, name) == getattr(Config(), name) for name in PERMISSIONS)


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

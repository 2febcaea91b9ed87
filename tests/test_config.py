"""The configuration: defaults that depend on the run, resolved once from the command line, the resume
rules, and the values that validation refuses."""

import contextlib
import re

import pytest

import finetune_gpu
from fashion_ft import config
from fashion_ft.config import PERMISSIONS, Config
from fashion_ft.errors import UsageError

WARM = config.FINETUNE_WARMUP_EPOCHS


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
    # --min-lr (default 1e-6) matters only to cosine: a smaller --lr with another scheduler is valid
    (["--lr", "1e-7", "--scheduler", "none"], {"lr": 1e-7}),
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
    with pytest.raises(UsageError, match=re.escape(refusal)) if refusal else contextlib.nullcontext():
        config.check_resume(SAVED, cfg)


def test_resume_restores_all_but_the_permissions():
    """--overwrite given to one run is no licence for the next, nor a record's --model-def code to run."""
    permissions = {name: True for name in PERMISSIONS - {"model_def"}}
    record = {**Config(lr=0.01, model_def="net.py:Net").to_dict(), **permissions}
    cfg = config.restored({**record, "a field of a later version": 1})
    assert cfg.lr == 0.01 and all(getattr(cfg, name) == getattr(Config(), name) for name in PERMISSIONS)


@pytest.mark.parametrize("mean, std, ok", [
    (0.2860, 0.3530, True), (0.1307, 0.3081, True), (0, 1 / 255, True), (-10, 1e-3, True), (10, 1e6, True),
    (0, 1e-40, False), (0, 0, False), (0, -1, False), (1e300, 1, False), (-10.5, 1, False),
    (float("nan"), 1, False), (0, float("nan"), False), (0, float("inf"), False), (True, 1, False), ("0", 1, False),
])
def test_normalize_bounds(mean, std, ok):
    """The rule the checkpoint loader also applies to a file's record: 1e-40 and 1e300 overflowed later."""
    assert config.normalize_ok(mean, std) is ok
    refusal = pytest.raises(UsageError, match=re.escape(f"--normalize: must be {config.NORMALIZE_RULE}"))
    with contextlib.nullcontext() if ok else refusal:
        config.check_normalize([mean, std])


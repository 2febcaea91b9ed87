"""Every field of a checkpoint that the tools read is checked at load: a bad one fails with one line that
names the file and the field (exact key path), before any training; a last.pt that lacks something
resuming needs is named the same way."""

import warnings

import pytest
import torch
from conftest import TINY, run_script, tiny_model

from fashion_ft.checkpoint import load_checkpoint, make_checkpoint, save_checkpoint, validate_resumable
from fashion_ft.data import CLASSES
from fashion_ft.errors import UserError
from fashion_ft.model import build_model

SPLIT = {"seed": 7, "val_size": 500, "fingerprint": "0123abcd"}


def ours(**changes):
    """Our checkpoint of a tiny cnn3, with top-level fields replaced."""
    return {**make_checkpoint(tiny_model(), "cnn3", TINY, split=SPLIT), **changes}


def load_error(tmp_path, obj, name="bad.pt", **kwargs) -> str:
    path = tmp_path / name
    torch.save(obj, path)
    with pytest.raises(UserError) as err:
        load_checkpoint(path, **kwargs)
    message = str(err.value)
    assert message.startswith(f"{path}: ") or message.startswith(f"{path} "), message
    assert "\n" not in message
    return message


def assert_names(message: str, field: str) -> None:
    assert f"checkpoint field '{field}' " in message, message


def with_meta_tensor(state_dict, key="features.0.weight"):
    return {**state_dict, key: torch.empty(state_dict[key].shape, device="meta")}


# ---------------------------------------------------------------- our format's fields

BAD_FIELDS = {
    "std zero": ({"normalize": {"mean": 0.286, "std": 0.0}}, "normalize.std"),
    "std negative": ({"normalize": {"mean": 0.286, "std": -0.35}}, "normalize.std"),
    "std text": ({"normalize": {"mean": 0.286, "std": "0.35"}}, "normalize.std"),
    "std nan": ({"normalize": {"mean": 0.286, "std": float("nan")}}, "normalize.std"),
    "std inf": ({"normalize": {"mean": 0.286, "std": float("inf")}}, "normalize.std"),
    "mean text": ({"normalize": {"mean": "a", "std": 0.35}}, "normalize.mean"),
    "mean none": ({"normalize": {"mean": None, "std": 0.35}}, "normalize.mean"),
    "mean bool": ({"normalize": {"mean": True, "std": 0.35}}, "normalize.mean"),
    "mean -inf": ({"normalize": {"mean": float("-inf"), "std": 0.35}}, "normalize.mean"),
    "normalize list": ({"normalize": [0.286, 0.353]}, "normalize"),
    "classes text": ({"classes": ",".join(CLASSES)}, "classes"),
    "classes dict": ({"classes": dict(enumerate(CLASSES))}, "classes"),
    "classes 9": ({"classes": CLASSES[:9]}, "classes"),
    "classes 11": ({"classes": [*CLASSES, "Hat"]}, "classes"),
    "classes numbers": ({"classes": list(range(10))}, "classes[0]"),
    "classes empty name": ({"classes": [*CLASSES[:9], ""]}, "classes[9]"),
    "classes twice": ({"classes": [*CLASSES[:9], CLASSES[0]]}, "classes"),
    "metrics list": ({"metrics": [0.9]}, "metrics"),
    "metrics none": ({"metrics": None}, "metrics"),
    "config text": ({"config": "lr=0.1"}, "config"),
    "config int key": ({"config": {1: "a"}}, "config"),
    "history dict": ({"history": {"epoch": 1}}, "history"),
    "history row": ({"history": [{"epoch": 1}, 0.5]}, "history[1]"),
    "split text": ({"split": "seed 7"}, "split"),
    "split seed text": ({"split": {**SPLIT, "seed": "7"}}, "split.seed"),
    "split seed bool": ({"split": {**SPLIT, "seed": True}}, "split.seed"),
    "split seed huge": ({"split": {**SPLIT, "seed": 2**70}}, "split.seed"),
    "split val_size 0": ({"split": {**SPLIT, "val_size": 0}}, "split.val_size"),
    "split val_size missing": ({"split": {"seed": 7, "fingerprint": "ab"}}, "split.val_size"),
    "split fingerprint": ({"split": {**SPLIT, "fingerprint": 123}}, "split.fingerprint"),
    "arch number": ({"arch": 3}, "arch"),
    "arch unknown": ({"arch": "resnet50"}, "arch"),
    "arch_kwargs list": ({"arch_kwargs": [4, 8, 8]}, "arch_kwargs"),
    "kind number": ({"kind": 1}, "kind"),
}


@pytest.mark.parametrize("case", list(BAD_FIELDS))
def test_bad_field_in_our_format_is_named(tmp_path, case):
    changes, field = BAD_FIELDS[case]
    assert_names(load_error(tmp_path, ours(**changes)), field)


def test_good_fields_load(tmp_path):
    """The checks refuse only what is wrong: integers, tuples, a missing optional field all load."""
    ckpt = ours(normalize={"mean": 0, "std": 1}, classes=tuple(CLASSES), split=None)
    del ckpt["metrics"], ckpt["history"]
    torch.save(ckpt, tmp_path / "ok.pt")
    loaded = load_checkpoint(tmp_path / "ok.pt")
    assert (loaded.mean, loaded.std, loaded.classes, loaded.split) == (0.0, 1.0, CLASSES, None)


# ---------------------------------------------------------------- weights without data, heads of another size

@pytest.mark.parametrize("fmt, field", [
    ("ours", "model.features.0.weight"),
    ("bare", "features.0.weight"),
    ("state_dict", "state_dict.features.0.weight"),
    ("model_state_dict", "model_state_dict.features.0.weight"),
])
def test_meta_device_tensors_are_named(tmp_path, fmt, field):
    weights = with_meta_tensor(tiny_model().state_dict())
    weights = with_meta_tensor(weights, "classifier.5.bias")
    obj = {"ours": lambda: ours(model=weights), "bare": lambda: weights}.get(fmt, lambda: {fmt: weights})()
    message = load_error(tmp_path, obj)
    assert_names(message, field)
    assert "meta-device tensor (and 1 more)" in message


def test_model_built_on_the_meta_device_is_named(tmp_path):
    """What a user gets from saving a model built under torch.device("meta") without loading weights."""
    with torch.device("meta"):
        model = build_model("cnn3", TINY)
    assert_names(load_error(tmp_path, model.state_dict()), "features.0.weight")


@pytest.mark.parametrize("fmt, field", [
    ("ours", "arch_kwargs.num_classes"),
    ("bare", "classifier.5.weight"),
    ("model_state_dict", "model_state_dict.classifier.5.weight"),
    ("module.", "classifier.5.weight"),
])
@pytest.mark.parametrize("classes", [11, 2])
def test_head_with_another_class_count_is_named(tmp_path, fmt, field, classes):
    model = tiny_model(num_classes=classes)
    builders = {
        "ours": lambda: make_checkpoint(model, "cnn3", {**TINY, "num_classes": classes}),
        "bare": lambda: model.state_dict(),
        "model_state_dict": lambda: {"model_state_dict": model.state_dict()},
        "module.": lambda: {f"module.{k}": v for k, v in model.state_dict().items()},
    }
    message = load_error(tmp_path, builders[fmt]())
    assert_names(message, field)
    assert f"{classes} output classes, Fashion-MNIST has 10" in message


def test_ten_class_head_still_loads_in_every_format(tmp_path):
    model = tiny_model()
    for i, obj in enumerate([make_checkpoint(model, "cnn3", TINY), model.state_dict(), {"model": model.state_dict()}]):
        torch.save(obj, tmp_path / f"{i}.pt")
        assert load_checkpoint(tmp_path / f"{i}.pt").arch_kwargs["num_classes"] == 10


# ---------------------------------------------------------------- TorchScript archives

def save_torchscript(kind: str, path):
    model = tiny_model()
    with warnings.catch_warnings():  # torch.jit is deprecated in favour of torch.export; users still have these
        warnings.simplefilter("ignore")
        traced = torch.jit.trace(model, torch.zeros(1, 1, 28, 28)) if kind == "traced" else torch.jit.script(model)
        torch.jit.save(traced, path)
    return path


@pytest.mark.parametrize("kind, trust_pickle", [("scripted", False), ("scripted", True), ("traced", False)])
def test_torchscript_archive_says_what_it_is_and_how_to_convert(tmp_path, kind, trust_pickle):
    path = save_torchscript(kind, tmp_path / f"{kind}.pt")
    with pytest.raises(UserError) as err:
        load_checkpoint(path, trust_pickle=trust_pickle)
    message = str(err.value)
    assert message.startswith(f"{path} is a TorchScript archive") and "\n" not in message
    assert "truncated or corrupt" not in message
    assert f"torch.jit.load('{path}').state_dict()" in message


def test_the_suggested_conversion_loads(tmp_path):
    path = save_torchscript("scripted", tmp_path / "scripted.pt")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.save(torch.jit.load(path).state_dict(), tmp_path / "weights.pt")
    assert load_checkpoint(tmp_path / "weights.pt").arch_kwargs["channels"] == TINY["channels"]


# ---------------------------------------------------------------- the recorded split

def test_split_is_recorded_and_read_back(tmp_path):
    save_checkpoint(ours(), tmp_path / "c.pt")
    assert load_checkpoint(tmp_path / "c.pt").split == SPLIT
    assert torch.load(tmp_path / "c.pt", weights_only=True)["split"] == SPLIT  # plain torch reads it too


def test_split_unknown_is_none(tmp_path):
    old = ours()
    del old["split"]
    unfingerprinted = ours(split={**SPLIT, "fingerprint": None})
    for name, obj in [("old", old), ("bare", tiny_model().state_dict()), ("none", unfingerprinted)]:
        torch.save(obj, tmp_path / f"{name}.pt")
    assert load_checkpoint(tmp_path / "old.pt").split is None
    assert load_checkpoint(tmp_path / "bare.pt").split is None
    assert load_checkpoint(tmp_path / "none.pt").split == {**SPLIT, "fingerprint": None}
    assert "split" not in make_checkpoint(tiny_model(), "cnn3", TINY)


# ---------------------------------------------------------------- resumable checkpoints

def last_checkpoint(**changes) -> dict:
    """A last.pt as a CPU run writes it: an empty scaler state and no moving average."""
    model = tiny_model()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    model(torch.zeros(2, 1, 28, 28)).sum().backward()
    optimizer.step()
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    stopper = {"best": 0.41, "best_epoch": 1, "bad_epochs": 0}
    ckpt = make_checkpoint(model, "cnn3", TINY, history=[{"epoch": 0, "val_loss": 0.5}, {"epoch": 1, "val_loss": 0.41}],
                           config={"lr": 0.1}, split=SPLIT)
    ckpt.update(kind="last", epoch=1, run_name="run", optimizer=optimizer.state_dict(),
                schedulers={"per_batch": scheduler.state_dict(), "plateau": None},
                scaler=torch.amp.GradScaler("cpu", enabled=False).state_dict(), early_stopping=stopper,
                selection=dict(stopper), best_model=model.state_dict(), ema=None, world_size=1)
    ckpt.update(changes)
    return ckpt


def resume_error(tmp_path, ckpt) -> str:
    path = tmp_path / "last.pt"
    save_checkpoint(ckpt, path)
    loaded = load_checkpoint(path)
    with pytest.raises(UserError) as err:
        validate_resumable(path, loaded.meta)
    message = str(err.value)
    assert message.startswith(f"{path}: ") and "\n" not in message
    return message


def test_complete_last_checkpoint_is_resumable(tmp_path):
    save_checkpoint(last_checkpoint(), tmp_path / "last.pt")
    validate_resumable(tmp_path / "last.pt", load_checkpoint(tmp_path / "last.pt").meta)
    ema = torch.optim.swa_utils.AveragedModel(tiny_model(), use_buffers=True).state_dict()
    save_checkpoint(last_checkpoint(ema=ema), tmp_path / "ema.pt")
    validate_resumable(tmp_path / "ema.pt", load_checkpoint(tmp_path / "ema.pt").meta)


@pytest.mark.parametrize("field", ["optimizer", "schedulers", "scaler", "early_stopping", "best_model", "history",
                                   "epoch", "config", "run_name", "normalize"])
def test_missing_resume_field_is_named(tmp_path, field):
    ckpt = last_checkpoint()
    del ckpt[field]
    message = resume_error(tmp_path, ckpt)
    assert f"checkpoint field '{field}' is missing" in message and "--model-path" in message


BAD_RESUME_FIELDS = {
    "optimizer none": ({"optimizer": None}, "optimizer"),
    "optimizer no state": ({"optimizer": {"param_groups": [{"params": [0]}]}}, "optimizer.state"),
    "optimizer no groups": ({"optimizer": {"state": {}, "param_groups": []}}, "optimizer.param_groups"),
    "schedulers list": ({"schedulers": []}, "schedulers"),
    "schedulers per_batch": ({"schedulers": {"plateau": None}}, "schedulers.per_batch"),
    "schedulers plateau": ({"schedulers": {"per_batch": {}, "plateau": 3}}, "schedulers.plateau"),
    "scaler none": ({"scaler": None}, "scaler"),
    "stopper best text": ({"early_stopping": {"best": "0.4", "best_epoch": 1, "bad_epochs": 0}}, "early_stopping.best"),
    "stopper epoch float": ({"early_stopping": {"best": 0.4, "best_epoch": 1.0, "bad_epochs": 0}},
                            "early_stopping.best_epoch"),
    "selection bad": ({"selection": {"best": 0.4, "best_epoch": 1, "bad_epochs": -1}}, "selection.bad_epochs"),
    "best_model shape": ({"best_model": {**tiny_model().state_dict(), "classifier.5.bias": torch.zeros(11)}},
                         "best_model.classifier.5.bias"),
    "best_model missing key": ({"best_model": {k: v for k, v in tiny_model().state_dict().items()
                                               if k != "features.1.running_var"}}, "best_model.features.1.running_var"),
    "best_model meta": ({"best_model": with_meta_tensor(tiny_model().state_dict())}, "best_model.features.0.weight"),
    "best_model list": ({"best_model": [1]}, "best_model"),
    "history row epoch": ({"history": [{"val_loss": 0.5}]}, "history[0].epoch"),
    "epoch float": ({"epoch": 1.0}, "epoch"),
    "epoch negative": ({"epoch": -1}, "epoch"),
    "run_name none": ({"run_name": None}, "run_name"),
    "ema list": ({"ema": [1]}, "ema"),
}


@pytest.mark.parametrize("case", list(BAD_RESUME_FIELDS))
def test_bad_resume_field_is_named(tmp_path, case):
    changes, field = BAD_RESUME_FIELDS[case]
    assert_names(resume_error(tmp_path, last_checkpoint(**changes)), field)


@pytest.mark.parametrize("obj", [ours(), {"model": tiny_model().state_dict()}], ids=["best-model", "other-format"])
def test_not_a_last_checkpoint_is_refused(tmp_path, obj):
    torch.save(obj, tmp_path / "c.pt")
    with pytest.raises(UserError, match="is not a resumable checkpoint"):
        validate_resumable(tmp_path / "c.pt", load_checkpoint(tmp_path / "c.pt").meta)


# ---------------------------------------------------------------- as a user sees it

@pytest.mark.slow
def test_test_model_names_each_bad_field(tmp_path):
    """One run of the real CLI with three bad files: exit 1, each file and field named, no traceback."""
    files = {"std.pt": (ours(normalize={"mean": 0.286, "std": 0}), "normalize.std"),
             "head.pt": (tiny_model(num_classes=11).state_dict(), "classifier.5.weight"),
             "classes.pt": (ours(classes=CLASSES[:9]), "classes")}
    for name, (obj, _) in files.items():
        torch.save(obj, tmp_path / name)
    result = run_script("test_model.py", "--model-path", *(tmp_path / n for n in files), "--device", "cpu",
                        "--batches", "1", "--batch-size", "64", timeout=120)
    output = result.stdout + result.stderr
    assert result.returncode == 1, output
    assert "Traceback" not in output
    for name, (_, field) in files.items():
        assert f"{tmp_path / name}: checkpoint field '{field}' " in output, output


def test_a_failed_import_of_the_users_file_is_not_kept(tmp_path):
    """The second build in one process repeats the first one's error: the half-run module is dropped."""
    from fashion_ft import userdef

    path = tmp_path / "user-net.py"
    path.write_text("def broken(:\n")
    definition = userdef.parse(f"{path}:Net")
    for _ in range(2):
        with pytest.raises(UserError, match="syntax error"):
            userdef.build(definition, {})

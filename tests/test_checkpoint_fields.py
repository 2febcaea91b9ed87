"""Every field of a checkpoint that the tools read is checked at load: a bad one fails with one line that
names the file and the field, before any training; a last.pt that lacks something resuming reads, or
holds it wrong, is named the same way."""

import pytest
import torch
from conftest import TINY, run_script, tiny_model

from fashion_ft.checkpoint import load_checkpoint, make_checkpoint, save_checkpoint, validate_resumable
from fashion_ft.data import CLASSES
from fashion_ft.errors import UserError

SPLIT = {"seed": 7, "val_size": 500, "fingerprint": "0123abcd"}
MISSING = object()


def ours(**changes):
    """Our checkpoint of a tiny cnn3, with top-level fields replaced."""
    return {**make_checkpoint(tiny_model(), "cnn3", TINY, split=SPLIT), **changes}


def named(call, path, field) -> None:
    with pytest.raises(UserError) as err:
        call()
    message = str(err.value)
    assert message.startswith(f"{path}") and "\n" not in message, message
    assert f"checkpoint field '{field}' " in message, message


# ---------------------------------------------------------------- our format's fields

STD = {"mean": 0.286, "std": 0.35}
BAD_FIELDS = {
    **{f"std {v!r}": ({"normalize": {**STD, "std": v}}, "normalize") for v in (0.0, -0.35, "0.35", float("nan"), float("inf"))},
    **{f"mean {v!r}": ({"normalize": {**STD, "mean": v}}, "normalize") for v in ("a", None, True, float("-inf"), 11)},
    "normalize list": ({"normalize": [0.286, 0.353]}, "normalize"),
    "classes text": ({"classes": ",".join(CLASSES)}, "classes"),
    "classes dict": ({"classes": dict(enumerate(CLASSES))}, "classes"),
    "classes 9": ({"classes": CLASSES[:9]}, "classes"),
    "classes 11": ({"classes": [*CLASSES, "Hat"]}, "classes"),
    "classes numbers": ({"classes": list(range(10))}, "classes"),
    "classes unhashable": ({"classes": [[c] for c in CLASSES]}, "classes"),
    "classes empty name": ({"classes": [*CLASSES[:9], ""]}, "classes"),
    "classes twice": ({"classes": [*CLASSES[:9], CLASSES[0]]}, "classes"),
    "metrics list": ({"metrics": [0.9]}, "metrics"),
    "metrics none": ({"metrics": None}, "metrics"),
    "config text": ({"config": "lr=0.1"}, "config"),
    "config int key": ({"config": {1: "a"}}, "config"),
    "history dict": ({"history": {"epoch": 1}}, "history"),
    "history row": ({"history": [{"epoch": 1}, 0.5]}, "history"),
    "history row without epoch": ({"history": [{"val_loss": 0.5}]}, "history"),
    "split text": ({"split": "seed 7"}, "split"),
    "split seed text": ({"split": {**SPLIT, "seed": "7"}}, "split"),
    "split seed bool": ({"split": {**SPLIT, "seed": True}}, "split"),
    "split seed huge": ({"split": {**SPLIT, "seed": 2**70}}, "split"),
    "split val_size 0": ({"split": {**SPLIT, "val_size": 0}}, "split"),
    "split val_size missing": ({"split": {"seed": 7, "fingerprint": "ab"}}, "split"),
    "split fingerprint": ({"split": {**SPLIT, "fingerprint": 123}}, "split"),
    "split fingerprint empty": ({"split": {**SPLIT, "fingerprint": ""}}, "split"),
    "split validation": ({"split": {**SPLIT, "validation": ["test"]}}, "split"),
    "arch number": ({"arch": 3}, "arch"),
    "arch unknown": ({"arch": "resnet50"}, "arch"),
    "arch_kwargs list": ({"arch_kwargs": [4, 8, 8]}, "arch_kwargs"),
    "kind number": ({"kind": 1}, "kind"),
    "model_def text": ({"model_def": "net.py:Net"}, "model_def"),
    "model_def no class": ({"model_def": {"given": "net.py"}}, "model_def"),
    "teachers": ({"teachers": [{"path": "t.pt"}]}, "teachers"),
}


@pytest.mark.parametrize("case", list(BAD_FIELDS))
def test_bad_field_in_our_format_is_named(tmp_path, case):
    changes, field = BAD_FIELDS[case]
    torch.save(ours(**changes), tmp_path / "bad.pt")
    named(lambda: load_checkpoint(tmp_path / "bad.pt"), tmp_path / "bad.pt", field)


def test_good_fields_load(tmp_path):
    """The checks refuse only what is wrong: integers, tuples, a missing or None optional field all load."""
    ckpt = ours(normalize={"mean": 0, "std": 1}, classes=tuple(CLASSES), split=None, model_def=None)
    del ckpt["metrics"], ckpt["history"]
    torch.save(ckpt, tmp_path / "ok.pt")
    loaded = load_checkpoint(tmp_path / "ok.pt")
    assert (loaded.mean, loaded.std, loaded.split) == (0.0, 1.0, None)


def test_split_is_recorded_and_read_back(tmp_path):
    save_checkpoint(ours(), tmp_path / "c.pt")
    assert load_checkpoint(tmp_path / "c.pt").split.to_dict() == {**SPLIT, "validation": "train"}
    assert torch.load(tmp_path / "c.pt", weights_only=True)["split"] == SPLIT  # plain torch reads it too


def test_split_unknown_is_none(tmp_path):
    old = ours()
    del old["split"]
    for name, obj in [("old", old), ("bare", tiny_model().state_dict()), ("none", ours(split={**SPLIT, "fingerprint": None}))]:
        torch.save(obj, tmp_path / f"{name}.pt")
    assert load_checkpoint(tmp_path / "old.pt").split is None
    assert load_checkpoint(tmp_path / "bare.pt").split is None
    assert load_checkpoint(tmp_path / "none.pt").split.to_dict() == {**SPLIT, "fingerprint": None, "validation": "train"}
    assert "split" not in make_checkpoint(tiny_model(), "cnn3", TINY)


# ---------------------------------------------------------------- resumable checkpoints

def last_checkpoint(**changes) -> dict:
    """A last.pt as a CPU run writes it (an empty scaler state, no moving average); MISSING removes a field."""
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
    return {k: v for k, v in ckpt.items() if v is not MISSING}


def resumable(path, ckpt) -> None:
    save_checkpoint(ckpt, path)
    validate_resumable(path, load_checkpoint(path).meta)


def test_complete_last_checkpoint_is_resumable(tmp_path):
    resumable(tmp_path / "last.pt", last_checkpoint())
    resumable(tmp_path / "ema.pt", last_checkpoint(
        ema=torch.optim.swa_utils.AveragedModel(tiny_model(), use_buffers=True).state_dict(), selection=MISSING))


def meta_tensor(state_dict, key="features.0.weight"):
    return {**state_dict, key: torch.empty(state_dict[key].shape, device="meta")}


BAD_RESUME_FIELDS = {
    **{f"{field} missing": ({field: MISSING}, field) for field in (
        "optimizer", "schedulers", "scaler", "early_stopping", "best_model", "history", "epoch", "config", "run_name",
        "normalize", "arch")},
    "optimizer none": ({"optimizer": None}, "optimizer"),
    "optimizer no state": ({"optimizer": {"param_groups": [{"params": [0]}]}}, "optimizer"),
    "optimizer no groups": ({"optimizer": {"state": {}, "param_groups": []}}, "optimizer"),
    "schedulers list": ({"schedulers": []}, "schedulers"),
    "schedulers per_batch": ({"schedulers": {"plateau": None}}, "schedulers"),
    "schedulers plateau": ({"schedulers": {"per_batch": {}, "plateau": 3}}, "schedulers"),
    "scaler none": ({"scaler": None}, "scaler"),
    "stopper best text": ({"early_stopping": {"best": "0.4", "best_epoch": 1, "bad_epochs": 0}}, "early_stopping"),
    "stopper epoch float": ({"early_stopping": {"best": 0.4, "best_epoch": 1.0, "bad_epochs": 0}}, "early_stopping"),
    "selection bad": ({"selection": {"best": 0.4, "best_epoch": 1, "bad_epochs": -1}}, "selection"),
    "best_model shape": ({"best_model": {**tiny_model().state_dict(), "classifier.5.bias": torch.zeros(11)}},
                         "best_model.classifier.5.bias"),
    "best_model missing key": ({"best_model": {k: v for k, v in tiny_model().state_dict().items()
                                               if k != "features.1.running_var"}}, "best_model.features.1.running_var"),
    "best_model meta": ({"best_model": meta_tensor(tiny_model().state_dict())}, "best_model.features.0.weight"),
    "best_model list": ({"best_model": [1]}, "best_model"),
    "epoch float": ({"epoch": 1.0}, "epoch"),
    "epoch negative": ({"epoch": -1}, "epoch"),
    "run_name none": ({"run_name": None}, "run_name"),
    "ema list": ({"ema": [1]}, "ema"),
}


@pytest.mark.parametrize("case", list(BAD_RESUME_FIELDS))
def test_bad_resume_field_is_named(tmp_path, case):
    changes, field = BAD_RESUME_FIELDS[case]
    path = tmp_path / "last.pt"
    named(lambda: resumable(path, last_checkpoint(**changes)), path, field)


@pytest.mark.parametrize("obj", [ours(), {"model": tiny_model().state_dict()}], ids=["best-model", "other-format"])
def test_not_a_last_checkpoint_is_refused(tmp_path, obj):
    torch.save(obj, tmp_path / "c.pt")
    with pytest.raises(UserError, match="is not a resumable checkpoint"):
        validate_resumable(tmp_path / "c.pt", load_checkpoint(tmp_path / "c.pt").meta)


# ---------------------------------------------------------------- as a user sees it

@pytest.mark.slow
def test_test_model_names_each_bad_field(tmp_path):
    """One run of the real CLI with three bad files: exit 1, each file and field named, no traceback."""
    files = {"std.pt": (ours(normalize={"mean": 0.286, "std": 0}), "normalize"),
             "head.pt": (tiny_model(num_classes=11).state_dict(), "classifier.5.weight"),
             "classes.pt": (ours(classes=CLASSES[:9]), "classes")}
    for name, (obj, _) in files.items():
        torch.save(obj, tmp_path / name)
    result = run_script("test_model.py", "--model-path", *(tmp_path / n for n in files), "--device", "cpu",
                        "--batches", "1", "--batch-size", "64", timeout=120)
    output = result.stdout + result.stderr
    assert result.returncode == 1 and "Traceback" not in output, output
    for name, (_, field) in files.items():
        assert f"{tmp_path / name}: checkpoint field '{field}' " in output, output


def test_a_failed_import_of_the_users_file_is_not_kept(tmp_path):
    """The second build in one process repeats the first one's error: the half-run module is dropped."""
    from fashion_ft import model

    path = tmp_path / "user-net.py"
    path.write_text("def broken(:\n")
    definition = model.parse(f"{path}:Net")
    for _ in range(2):
        with pytest.raises(UserError, match="syntax error"):
            model.build(definition, {})

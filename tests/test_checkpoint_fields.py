"""Every field of a checkpoint that the tools read is checked at load: a bad one fails with one line that
names the file and the field, before any training; a last.pt that lacks something resuming reads, or
holds it wrong, is named the same way."""

import pytest
import torch
from conftest import TINY, run_script, tiny_model
from torch import nn

from fashion_ft import model
from fashion_ft.checkpoint import load_checkpoint, make_checkpoint, save_checkpoint, validate_resumable
from fashion_ft.data import CLASSES, MEAN, STD
from fashion_ft.errors import UserError

SPLIT = {"seed": 7, "val_size": 500, "fingerprint": "0123abcd"}
MISSING = object()


def ours(**changes):
    """Our checkpoint of a tiny cnn3, with top-level fields replaced."""
    return {**make_checkpoint(tiny_model(), "cnn3", TINY, split=SPLIT), **changes}


def cases(table: dict) -> list:
    """{field: [its bad values]} -> the parameters (field, value)."""
    return [pytest.param(field, value, id=f"{field}-{'missing' if value is MISSING else i}")
            for field, values in table.items() for i, value in enumerate(values)]


def named(call, path, field) -> None:
    with pytest.raises(UserError) as err:
        call()
    assert str(err.value).startswith(f"{path}: checkpoint field '{field}' ") and "\n" not in str(err.value), err.value


# ---------------------------------------------------------------- our format's fields

NORMALIZE = {"mean": 0.286, "std": 0.35}
BAD_FIELDS = {  # field: values a file of ours cannot hold there
    "normalize": [*({**NORMALIZE, "std": v} for v in (0.0, -0.35, "0.35", float("nan"), float("inf"))),
                  *({**NORMALIZE, "mean": v} for v in ("a", None, True, float("-inf"), 11)), [0.286, 0.353]],
    "classes": [",".join(CLASSES), dict(enumerate(CLASSES)), CLASSES[:9], [*CLASSES, "Hat"], list(range(10)),
                [[c] for c in CLASSES], [*CLASSES[:9], ""], [*CLASSES[:9], CLASSES[0]]],
    "metrics": [[0.9], None],
    "config": ["lr=0.1", {1: "a"}],
    "history": [{"epoch": 1}, [{"epoch": 1}, 0.5], [{"val_loss": 0.5}]],
    "split": ["seed 7", {"seed": 7, "fingerprint": "ab"}, *({**SPLIT, **change} for change in (
        {"seed": "7"}, {"seed": True}, {"seed": 2**70}, {"val_size": 0}, {"fingerprint": 123}, {"fingerprint": ""},
        {"validation": ["test"]}))],
    "arch": [3, "resnet50"],
    "arch_kwargs": [[4, 8, 8]],
    "kind": [1],
    "model_def": ["net.py:Net", {"given": "net.py"}],
    "teachers": [[{"path": "t.pt"}]],
}


@pytest.mark.parametrize("field, value", cases(BAD_FIELDS))
def test_bad_field_in_our_format_is_named(tmp_path, field, value):
    torch.save(ours(**{field: value}), tmp_path / "bad.pt")
    named(lambda: load_checkpoint(tmp_path / "bad.pt"), tmp_path / "bad.pt", field)


@pytest.mark.parametrize("changes, split", [  # the split the file gives, as Split.to_dict()
    ({}, {**SPLIT, "validation": "train"}),
    ({"split": MISSING}, None),  # unknown in a file written before splits were recorded
    ({"split": {**SPLIT, "fingerprint": None}}, {**SPLIT, "fingerprint": None, "validation": "train"}),
    # integers, tuples, a missing or None optional field: the checks refuse only what is wrong
    ({"normalize": {"mean": 0, "std": 1}, "classes": tuple(CLASSES), "split": None, "model_def": None,
      "metrics": MISSING, "history": MISSING}, None),
])
def test_good_and_unknown_fields_load(tmp_path, changes, split):
    torch.save({k: v for k, v in ours(**changes).items() if v is not MISSING}, tmp_path / "ok.pt")
    loaded = load_checkpoint(tmp_path / "ok.pt")
    assert (loaded.split and loaded.split.to_dict()) == split
    assert (loaded.mean, loaded.std) == ((0.0, 1.0) if "normalize" in changes else (MEAN, STD))


def test_plain_torch_reads_what_we_write(tmp_path):
    """torch.load(weights_only=True) reads our file without fashion_ft, with plain tensor names even when it
    was written from inside DDP's and torch.compile's wrappers."""
    outer, inner = nn.Module(), nn.Module()  # their shapes, without starting either
    outer.module, inner._orig_mod = inner, tiny_model()
    save_checkpoint(make_checkpoint(outer, "cnn3", TINY, metrics={"val_acc": 0.9}, split=SPLIT), tmp_path / "c.pt")
    raw = torch.load(tmp_path / "c.pt", weights_only=True)
    assert (raw["arch"], raw["arch_kwargs"], raw["metrics"], raw["split"]) == ("cnn3", TINY, {"val_acc": 0.9}, SPLIT)
    assert raw["model"].keys() == tiny_model().state_dict().keys()
    assert "split" not in make_checkpoint(tiny_model(), "cnn3", TINY)  # None: unknown, left out


# ---------------------------------------------------------------- resumable checkpoints

def last_checkpoint(**changes) -> dict:
    """A last.pt as a CPU run writes it (an empty scaler state, no moving average); MISSING removes a field."""
    net = tiny_model()
    optimizer = torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9)
    net(torch.zeros(2, 1, 28, 28)).sum().backward()
    optimizer.step()
    stopper = {"best": 0.41, "best_epoch": 1, "bad_epochs": 0}
    ckpt = make_checkpoint(net, "cnn3", TINY, history=[{"epoch": 0, "val_loss": 0.5}, {"epoch": 1, "val_loss": 0.41}],
                           config={"lr": 0.1}, split=SPLIT)
    ckpt.update(kind="last", epoch=1, run_name="run", optimizer=optimizer.state_dict(),
                schedulers={"per_batch": torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1).state_dict(),
                            "plateau": None},
                scaler=torch.amp.GradScaler("cpu", enabled=False).state_dict(), early_stopping=stopper,
                selection=dict(stopper), best_model=net.state_dict(), ema=None, world_size=1)
    return {k: v for k, v in {**ckpt, **changes}.items() if v is not MISSING}


def resumable(path, ckpt) -> None:
    save_checkpoint(ckpt, path)
    validate_resumable(path, load_checkpoint(path).meta)


def test_only_a_complete_last_checkpoint_is_resumable(tmp_path):
    resumable(tmp_path / "last.pt", last_checkpoint())
    resumable(tmp_path / "ema.pt", last_checkpoint(
        ema=torch.optim.swa_utils.AveragedModel(tiny_model(), use_buffers=True).state_dict(), selection=MISSING))
    for obj in (ours(), {"model": tiny_model().state_dict()}):  # a best model of ours, another tool's file
        torch.save(obj, tmp_path / "c.pt")
        with pytest.raises(UserError, match="is not a resumable checkpoint"):
            validate_resumable(tmp_path / "c.pt", load_checkpoint(tmp_path / "c.pt").meta)


WEIGHTS = tiny_model().state_dict()
BAD_RESUME_FIELDS = {  # field: values a last.pt cannot resume from (MISSING: the field is absent)
    "optimizer": [MISSING, None, {"param_groups": [{"params": [0]}]}, {"state": {}, "param_groups": []}],
    "schedulers": [MISSING, [], {"plateau": None}, {"per_batch": {}, "plateau": 3}],
    "scaler": [MISSING, None],
    "early_stopping": [MISSING, {"best": "0.4", "best_epoch": 1, "bad_epochs": 0},
                       {"best": 0.4, "best_epoch": 1.0, "bad_epochs": 0}],
    "selection": [{"best": 0.4, "best_epoch": 1, "bad_epochs": -1}],
    "best_model": [MISSING, [1]],
    "epoch": [MISSING, 1.0, -1],
    "run_name": [MISSING, None],
    "ema": [[1]],
    "input_container": [3],
    **{field: [MISSING] for field in ("history", "config", "normalize", "arch")},
    # a best_model that does not match the model, named by the tensor: another shape, a key missing, no data
    **{f"best_model.{key}": [best] for key, best in {
        "classifier.5.bias": {**WEIGHTS, "classifier.5.bias": torch.zeros(11)},
        "features.1.running_var": {k: v for k, v in WEIGHTS.items() if k != "features.1.running_var"},
        "features.0.weight": {k: torch.empty_like(v, device="meta") for k, v in WEIGHTS.items()},
    }.items()},
}


@pytest.mark.parametrize("field, value", cases(BAD_RESUME_FIELDS))
def test_bad_resume_field_is_named(tmp_path, field, value):
    path = tmp_path / "last.pt"
    named(lambda: resumable(path, last_checkpoint(**{field.split(".")[0]: value})), path, field)


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
    path = tmp_path / "user-net.py"
    path.write_text("def broken(:\n")
    definition = model.parse(f"{path}:Net")
    for _ in range(2):
        with pytest.raises(UserError, match="syntax error"):
            model.build(definition, {})

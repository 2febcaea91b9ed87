"""Checkpoints: every format users already have loads with identical predictions; unsafe or bad files
are refused with one clear line; saving is atomic, and a full disk is one line that keeps the old file;
JSON is strict."""

import errno
import hashlib
import json
import os
import shutil

import pytest
import torch
from conftest import SMALL_CNN3
from torch import nn

from fashion_ft import checkpoint, model
from fashion_ft.checkpoint import (
    FORMAT_VERSION,
    atomic_write,
    load_checkpoint,
    make_checkpoint,
    nonfinite_tensors,
    save_checkpoint,
    save_json,
    strict_json,
)
from fashion_ft.errors import UserError
from fashion_ft.model import ARCHS, build_model

DEFAULT_WIDTH = {k: ARCHS["cnn3"].default_kwargs[k] for k in ("channels", "hidden")}
EARLIER_BASE_WIDTH = {"channels": [32, 64, 128], "hidden": 256}  # the shipped base model until 2026-11-28


class RunsCode:
    """Unpickling this runs a shell command: what a malicious checkpoint does."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def randomized(arch_kwargs, seed=0):
    """A cnn3 whose every tensor (BatchNorm statistics included) is random, so a mixed-up tensor shows."""
    torch.manual_seed(seed)
    model = build_model("cnn3", arch_kwargs)
    with torch.no_grad():
        for name, tensor in model.state_dict().items():
            if tensor.is_floating_point():
                tensor.copy_(torch.rand_like(tensor) + 0.5 if "running_var" in name else torch.randn_like(tensor) * 0.1)
    return model.eval()


@pytest.fixture(params=[DEFAULT_WIDTH, EARLIER_BASE_WIDTH, SMALL_CNN3], ids=["default-width", "earlier-base", "narrow"])
def reference(request):
    """(model, its kwargs, a batch, its logits)."""
    model = randomized(request.param)
    x = torch.randn(4, 1, 28, 28, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        return model, request.param, x, model(x)


def prefixed(state_dict, prefix):
    return {prefix + k: v for k, v in state_dict.items()}


def optimizer_state(model):
    return torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9).state_dict()


LEGACY_FORMATS = {
    "ours": lambda m, kw: make_checkpoint(m, "cnn3", kw),
    "bare": lambda m, kw: m.state_dict(),
    "model_state_dict": lambda m, kw: {"epoch": 3, "model_state_dict": m.state_dict(),
                                       "optimizer_state_dict": optimizer_state(m)},
    "state_dict": lambda m, kw: {"state_dict": m.state_dict(), "best_acc": 0.9},
    "model": lambda m, kw: {"model": m.state_dict()},
    "module.": lambda m, kw: prefixed(m.state_dict(), "module."),
    "_orig_mod.": lambda m, kw: prefixed(m.state_dict(), "_orig_mod."),
    "module._orig_mod.": lambda m, kw: prefixed(m.state_dict(), "module._orig_mod."),
    "_orig_mod.module.": lambda m, kw: prefixed(m.state_dict(), "_orig_mod.module."),
    "state_dict+module.": lambda m, kw: {"state_dict": prefixed(m.state_dict(), "module.")},
}


@pytest.mark.parametrize("fmt", list(LEGACY_FORMATS))
def test_every_format_loads_with_identical_predictions(tmp_path, reference, fmt):
    model, arch_kwargs, x, expected = reference
    torch.save(LEGACY_FORMATS[fmt](model, arch_kwargs), tmp_path / "ckpt.pt")
    ckpt = load_checkpoint(tmp_path / "ckpt.pt")
    # the arch is read from our file, or inferred from keys and shapes for all the others
    assert ckpt.arch == "cnn3"
    assert {k: ckpt.arch_kwargs[k] for k in arch_kwargs} == arch_kwargs
    with torch.no_grad():
        assert torch.equal(ckpt.build().eval()(x), expected)


def test_pickled_module_needs_trust(tmp_path, reference):
    model, _, x, expected = reference
    torch.save(model, tmp_path / "whole.pt")
    with pytest.raises(UserError, match="--trust-pickle"):
        load_checkpoint(tmp_path / "whole.pt")
    ckpt = load_checkpoint(tmp_path / "whole.pt", trust_pickle=True)
    assert "trusted" in ckpt.source_format
    with torch.no_grad():
        assert torch.equal(ckpt.build().eval()(x), expected)


def test_code_running_pickle_is_refused_without_running(tmp_path):
    marker = tmp_path / "MARKER"
    torch.save({"model": RunsCode(marker)}, tmp_path / "evil.pt")
    with pytest.raises(UserError, match="pickled Python objects"):
        load_checkpoint(tmp_path / "evil.pt")
    assert not marker.exists()


def test_newer_format_version_is_refused(tmp_path):
    ckpt = make_checkpoint(randomized(SMALL_CNN3), "cnn3", SMALL_CNN3)
    ckpt["format_version"] = FORMAT_VERSION + 1
    torch.save(ckpt, tmp_path / "future.pt")
    with pytest.raises(UserError, match="newer than this tool"):
        load_checkpoint(tmp_path / "future.pt")


def test_our_checkpoint_loads_with_plain_weights_only(tmp_path):
    save_checkpoint(make_checkpoint(randomized(SMALL_CNN3), "cnn3", SMALL_CNN3, metrics={"val_acc": 0.9}), tmp_path / "c.pt")
    # no fashion_ft needed to read it: anyone's torch.load(weights_only=True) works
    raw = torch.load(tmp_path / "c.pt", weights_only=True)
    assert raw["arch"] == "cnn3" and raw["arch_kwargs"]["channels"] == SMALL_CNN3["channels"]
    assert raw["metrics"] == {"val_acc": 0.9} and "features.0.weight" in raw["model"]


def test_our_checkpoint_without_arch_falls_back_to_inference(tmp_path):
    ckpt = make_checkpoint(randomized(SMALL_CNN3), "cnn3", SMALL_CNN3)
    del ckpt["arch"], ckpt["arch_kwargs"]
    torch.save(ckpt, tmp_path / "c.pt")
    assert load_checkpoint(tmp_path / "c.pt").arch_kwargs["channels"] == SMALL_CNN3["channels"]


def test_our_format_without_weights_is_a_user_error(tmp_path):
    ckpt = make_checkpoint(randomized(SMALL_CNN3), "cnn3", SMALL_CNN3)
    ckpt["model"] = None
    torch.save(ckpt, tmp_path / "c.pt")
    with pytest.raises(UserError, match="no model weights"):
        load_checkpoint(tmp_path / "c.pt")


# ---------------------------------------------------------------- damaged weights


@pytest.mark.parametrize("key, bad_shape", [
    ("features.0.weight", (33, 1, 3, 3)),  # a conv width: must not hide the whole arch
    ("features.5.running_var", (63,)),
    ("classifier.2.weight", (128, 100)),
    ("classifier.5.bias", (11,)),
])
def test_one_wrong_shape_names_key_and_both_shapes(tmp_path, key, bad_shape):
    state_dict = randomized(SMALL_CNN3).state_dict()
    good_shape = tuple(state_dict[key].shape)
    state_dict[key] = torch.zeros(bad_shape)
    torch.save(state_dict, tmp_path / "c.pt")
    with pytest.raises(UserError) as err:
        load_checkpoint(tmp_path / "c.pt")
    assert f"{key} has shape {bad_shape}, expected {good_shape}" in str(err.value)


def test_wrong_shape_in_our_format_names_the_key(tmp_path):
    ckpt = make_checkpoint(randomized(SMALL_CNN3), "cnn3", SMALL_CNN3)
    ckpt["model"]["classifier.5.weight"] = torch.zeros(10, 7)
    torch.save(ckpt, tmp_path / "c.pt")
    with pytest.raises(UserError, match=r"classifier.5.weight has shape \(10, 7\), expected \(10, 128\)"):
        load_checkpoint(tmp_path / "c.pt")


def test_nonfinite_tensors_are_named():
    state_dict = randomized(SMALL_CNN3).state_dict()
    state_dict["features.4.weight"][0, 0, 0, 0] = float("nan")
    state_dict["classifier.5.bias"][3] = float("inf")
    assert nonfinite_tensors(state_dict) == ["features.4.weight", "classifier.5.bias"]


# ---------------------------------------------------------------- files that are not checkpoints


def not_a_checkpoint(tmp_path, kind):
    path = tmp_path / f"{kind}.pt"
    if kind == "text":
        path.write_text("epoch,loss\n1,0.5\n")
    elif kind.startswith("random"):  # garbage fails inside the unpickler with many exception types
        gen = torch.Generator().manual_seed(int(kind.split("-")[1]))
        path.write_bytes(torch.randint(0, 256, (4096,), generator=gen, dtype=torch.uint8).numpy().tobytes())
    elif kind == "truncated":
        save_checkpoint(make_checkpoint(randomized(SMALL_CNN3), "cnn3", SMALL_CNN3), path)
        path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    elif kind == "empty":
        path.write_bytes(b"")
    elif kind == "list":
        torch.save([1, 2, 3], path)
    return path


@pytest.mark.parametrize("kind, expected", [
    ("missing", "not found"),
    ("empty", "empty"),
    ("text", "not a PyTorch checkpoint"),
    ("random-0", "not a PyTorch checkpoint"),
    ("random-1", "not a PyTorch checkpoint"),
    ("random-2", "not a PyTorch checkpoint"),
    ("truncated", "truncated or corrupt"),
    ("list", "not model weights"),
])
def test_not_a_checkpoint_is_one_clear_line(tmp_path, kind, expected):
    path = not_a_checkpoint(tmp_path, kind)
    with pytest.raises(UserError) as err:
        load_checkpoint(path)
    assert expected in str(err.value) and str(path) in str(err.value) and "\n" not in str(err.value)


# ---------------------------------------------------------------- atomic save


def test_save_leaves_only_the_target(tmp_path):
    save_checkpoint({"x": torch.ones(3)}, tmp_path / "sub" / "c.pt")
    assert [p.name for p in (tmp_path / "sub").iterdir()] == ["c.pt"]
    assert torch.equal(torch.load(tmp_path / "sub" / "c.pt", weights_only=True)["x"], torch.ones(3))


def half_then(error):
    def write(fh):
        fh.write(b"half a checkpoint")
        raise error
    return write


@pytest.mark.parametrize("error, raised", [
    (RuntimeError("crash mid-write"), RuntimeError),  # a bug, not the file system: its traceback helps
    (OSError(errno.ENOSPC, "No space left on device"), UserError),  # disk full: a user problem, one line
    (OSError(errno.EIO, "Input/output error"), UserError),
    (KeyboardInterrupt(), KeyboardInterrupt),
])
def test_failed_write_keeps_old_file_and_no_temp(tmp_path, error, raised):
    target = tmp_path / "best.pt"
    save_checkpoint({"version": torch.tensor(1)}, target)
    old_bytes = target.read_bytes()
    with pytest.raises(raised):
        atomic_write(target, half_then(error))
    assert target.read_bytes() == old_bytes
    assert [p.name for p in tmp_path.iterdir()] == ["best.pt"]


# ---------------------------------------------------------------- a full disk

TORCH_WRITE_FAILED = RuntimeError(
    "[enforce fail at inline_container.cc:626] . PytorchStreamWriter failed writing file data/3: file write failed"
)


def sha256(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


class FillsUp:
    """A file that takes `room` bytes, then fails as a full disk does (torch.save writes through it)."""

    def __init__(self, fh, room):
        self.fh, self.room = fh, room

    def write(self, data):
        size = memoryview(data).nbytes
        if size > self.room:
            raise OSError(errno.ENOSPC, "No space left on device")
        self.room -= size
        return self.fh.write(data)

    def flush(self):
        self.fh.flush()


@pytest.fixture
def full_disk(monkeypatch, tmp_path):
    """shutil.disk_usage reports a full disk while a temporary file is in tmp_path, as on a disk that the
    half-written checkpoint filled: the check must happen before that file is removed."""
    real = shutil.disk_usage

    def disk_usage(folder):
        usage = real(folder)
        if any(p.name.endswith(".tmp") for p in tmp_path.iterdir()):
            return usage._replace(free=4096)
        return usage

    monkeypatch.setattr(shutil, "disk_usage", disk_usage)


def old_best(tmp_path):
    target = tmp_path / "best.pt"
    save_checkpoint(make_checkpoint(randomized(SMALL_CNN3), "cnn3", SMALL_CNN3), target)
    return target, sha256(target)


def torch_save_into(room):
    return lambda fh: torch.save(make_checkpoint(randomized(SMALL_CNN3, seed=1), "cnn3", SMALL_CNN3), FillsUp(fh, room))


@pytest.mark.parametrize("writer", [
    pytest.param(half_then(TORCH_WRITE_FAILED), id="torch-file-write-failed"),
    pytest.param(half_then(OSError(errno.ENOSPC, "No space left on device")), id="enospc"),
    pytest.param(torch_save_into(0), id="torch.save-first-write"),  # torch passes the OSError on
    pytest.param(torch_save_into(3000), id="torch.save-mid-archive"),  # torch turns it into its RuntimeError
])
def test_full_disk_is_one_line_and_keeps_the_old_file(tmp_path, full_disk, writer):
    target, before = old_best(tmp_path)
    with pytest.raises(UserError) as err:
        atomic_write(target, writer)
    assert str(err.value) == f"no space left on device while writing {target}"
    assert sha256(target) == before
    assert [p.name for p in tmp_path.iterdir()] == ["best.pt"]


def test_full_disk_when_creating_the_temp_file(tmp_path, monkeypatch):
    target, before = old_best(tmp_path)

    def no_inodes(**_kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(checkpoint.tempfile, "mkstemp", no_inodes)
    with pytest.raises(UserError, match=r"^no space left on device while writing .*best\.pt$"):
        save_checkpoint({"x": torch.ones(2)}, target)
    assert sha256(target) == before


class NoRoom:
    """os.fdopen's file, on a disk with no room left."""

    def __init__(self, fh):
        self.fh = fh

    def __enter__(self):
        return FillsUp(self.fh, 0)

    def __exit__(self, *exc):
        self.fh.close()


def test_full_disk_while_writing_json(tmp_path, full_disk, monkeypatch):
    target = tmp_path / "metrics.json"
    save_json({"finished": True}, target)
    before = sha256(target)
    real_fdopen = os.fdopen
    monkeypatch.setattr(checkpoint.os, "fdopen", lambda fd, mode: NoRoom(real_fdopen(fd, mode)))
    with pytest.raises(UserError, match="no space left on device while writing"):
        save_json({"finished": False}, target)
    assert sha256(target) == before


def test_torch_write_failure_with_room_left_is_one_line(tmp_path):
    """Not a full disk (an I/O error, a quota): still the file system's fault, still one line."""
    target, before = old_best(tmp_path)
    with pytest.raises(UserError) as err:
        atomic_write(target, half_then(TORCH_WRITE_FAILED))
    assert str(err.value).startswith(f"cannot write {target}: torch could not write the file")
    assert "no space" not in str(err.value) and "\n" not in str(err.value)
    assert sha256(target) == before


# ---------------------------------------------------------------- strict JSON

def no_constants(name):
    raise AssertionError(f"{name} is not JSON")


def test_json_nonfinite_becomes_null_with_its_path(tmp_path):
    metrics = {"finished": False, "test_loss": float("nan"), "best": {"val_loss": float("inf"), "val_acc": 0.9},
               "history": [{"epoch": 1, "val_loss": 0.5}, {"epoch": 2, "val_loss": float("-inf")}],
               "epoch_s": (1.5, float("nan"))}
    save_json(metrics, tmp_path / "metrics.json")
    loaded = json.loads((tmp_path / "metrics.json").read_text(), parse_constant=no_constants)
    assert loaded["test_loss"] is None and loaded["best"] == {"val_loss": None, "val_acc": 0.9}
    assert loaded["history"][1] == {"epoch": 2, "val_loss": None} and loaded["epoch_s"] == [1.5, None]
    assert loaded["nonfinite"] == {"test_loss": "was NaN", "best.val_loss": "was Infinity",
                                   "history[1].val_loss": "was -Infinity", "epoch_s[1]": "was NaN"}
    assert metrics["test_loss"] != metrics["test_loss"]  # the caller's dict is left as it was


def test_json_without_nonfinite_values_is_unchanged(tmp_path):
    summary = {"passed": True, "checks": [{"name": "load", "data": {"accuracy": 0.9133, "n": 3}}], "x": None}
    save_json(summary, tmp_path / "s.json")
    assert json.loads((tmp_path / "s.json").read_text()) == summary == strict_json(summary)
    assert (tmp_path / "s.json").read_text() == json.dumps(summary, indent=2) + "\n"


@pytest.mark.parametrize("obj", [[float("nan")], {"nonfinite": 1, "loss": float("inf")}])
def test_json_nonfinite_that_cannot_be_recorded_is_refused(tmp_path, obj):
    with pytest.raises(ValueError):
        save_json(obj, tmp_path / "x.json")
    assert not (tmp_path / "x.json").exists()


# ---------------------------------------------------------------- unwrap


def test_unwrap_finds_the_model_inside_ddp_and_compile():
    net = build_model("cnn3", SMALL_CNN3)

    class Wrapper(nn.Module):  # DDP's and torch.compile's shapes, without starting either
        def __init__(self, attr, inner):
            super().__init__()
            setattr(self, attr, inner)

    assert model.unwrap(Wrapper("module", Wrapper("_orig_mod", net))) is net

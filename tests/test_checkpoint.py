"""Checkpoints: every format users already have loads with identical predictions; a file that is not a
checkpoint, or is damaged, is refused in one line that names it; saving is atomic, and a failed write is
one line that keeps the old file; JSON is strict."""

import errno
import json
import os
import random
import struct
import warnings

import pytest
import torch
from conftest import SMALL_CNN3, TINY, WrappedFile, tiny_model

from fashion_ft import checkpoint
from fashion_ft.checkpoint import load_checkpoint, make_checkpoint, save_checkpoint, save_json
from fashion_ft.errors import UserError
from fashion_ft.model import ARCHS, build_model

DEFAULT_WIDTH = {k: ARCHS["cnn3"].default_kwargs[k] for k in ("channels", "hidden")}
EARLIER_BASE_WIDTH = {"channels": [32, 64, 128], "hidden": 256}  # the shipped base model until 2026-11-28


def randomized(arch_kwargs):
    """A cnn3 whose every tensor (BatchNorm statistics included) is random, so a mixed-up tensor shows."""
    torch.manual_seed(0)
    net = build_model("cnn3", arch_kwargs)
    with torch.no_grad():
        for name, tensor in net.state_dict().items():
            if tensor.is_floating_point():
                tensor.copy_(torch.rand_like(tensor) + 0.5 if "running_var" in name else torch.randn_like(tensor) * 0.1)
    return net.eval()


def refused(path, **kwargs) -> str:
    """The one line that refuses `path`, which it names."""
    with pytest.raises(UserError) as err:
        load_checkpoint(path, **kwargs)
    message = str(err.value)
    assert str(path) in message and "\n" not in message, message
    return message


# ---------------------------------------------------------------- the formats users have

LEGACY_FORMATS = {
    "ours": lambda m, kw: make_checkpoint(m, "cnn3", kw),
    "bare": lambda m, kw: m.state_dict(),
    "model_state_dict": lambda m, kw: {"epoch": 3, "model_state_dict": m.state_dict(),
                                       "optimizer_state_dict": torch.optim.SGD(m.parameters(), lr=0.1).state_dict()},
    "state_dict": lambda m, kw: {"state_dict": m.state_dict(), "best_acc": 0.9},
    "model": lambda m, kw: {"model": m.state_dict()},
    **{prefix: lambda m, kw, prefix=prefix: {prefix + k: v for k, v in m.state_dict().items()}
       for prefix in ("module.", "_orig_mod.", "module._orig_mod.", "_orig_mod.module.")},
    "state_dict+module.": lambda m, kw: {"state_dict": {"module." + k: v for k, v in m.state_dict().items()}},
    "ours without arch": lambda m, kw: {k: v for k, v in make_checkpoint(m, "cnn3", kw).items() if "arch" not in k},
    "bare, pre-1.6 pickle": lambda m, kw: m.state_dict(),
}


@pytest.mark.parametrize("width", [DEFAULT_WIDTH, EARLIER_BASE_WIDTH, SMALL_CNN3], ids=["default", "earlier", "narrow"])
@pytest.mark.parametrize("fmt", list(LEGACY_FORMATS))
def test_every_format_loads_with_identical_predictions(tmp_path, fmt, width):
    net, x = randomized(width), torch.randn(4, 1, 28, 28, generator=torch.Generator().manual_seed(1))
    torch.save(LEGACY_FORMATS[fmt](net, width), tmp_path / "c.pt", _use_new_zipfile_serialization="pre-1.6" not in fmt)
    ckpt = load_checkpoint(tmp_path / "c.pt")
    # the arch is read from our file, or inferred from keys and shapes for all the others
    assert ckpt.arch == "cnn3" and {k: ckpt.arch_kwargs[k] for k in width} == width
    with torch.no_grad():
        assert torch.equal(ckpt.build().eval()(x), net(x))


def test_a_pickle_loads_only_when_trusted_and_never_runs_code_otherwise(tmp_path):
    net, x = randomized(SMALL_CNN3), torch.zeros(2, 1, 28, 28)
    torch.save(net, tmp_path / "whole.pt")
    marker = tmp_path / "MARKER"  # unpickling this object runs a shell command, as a malicious checkpoint does
    torch.save({"model": type("RunsCode", (), {"__reduce__": lambda _: (os.system, (f"touch {marker}",))})()},
               tmp_path / "evil.pt")
    assert "--trust-pickle" in refused(tmp_path / "whole.pt")
    assert "pickled Python objects" in refused(tmp_path / "evil.pt") and not marker.exists()
    ckpt = load_checkpoint(tmp_path / "whole.pt", trust_pickle=True)
    assert "trusted" in ckpt.source_format and ckpt.unpickled
    with torch.no_grad():
        assert torch.equal(ckpt.build().eval()(x), net(x))


def torchscript(path, traced=False) -> dict:
    """A tiny cnn3 saved with torch.jit; what the refusal suggests: its state_dict, as torch.jit.load reads it."""
    with warnings.catch_warnings():  # torch.jit is deprecated in favour of torch.export; users still have these
        warnings.simplefilter("ignore")
        net = tiny_model()
        torch.jit.save(torch.jit.trace(net, torch.zeros(1, 1, 28, 28)) if traced else torch.jit.script(net), path)
        return torch.jit.load(path).state_dict()


@pytest.mark.parametrize("traced, trust_pickle", [(False, False), (True, False), (False, True)])
def test_torchscript_is_refused_with_a_conversion_that_loads(tmp_path, traced, trust_pickle):
    torch.save(torchscript(tmp_path / "scripted.pt", traced), tmp_path / "weights.pt")
    message = refused(tmp_path / "scripted.pt", trust_pickle=trust_pickle)
    assert f"torch.jit.load('{tmp_path / 'scripted.pt'}').state_dict()" in message
    assert load_checkpoint(tmp_path / "weights.pt").arch_kwargs["channels"] == TINY["channels"]


def test_nonfinite_tensors_are_named():
    state_dict = randomized(SMALL_CNN3).state_dict()
    state_dict["features.4.weight"][0, 0, 0, 0] = float("nan")
    state_dict["classifier.5.bias"][3] = float("inf")
    assert checkpoint.nonfinite_tensors(state_dict) == ["features.4.weight", "classifier.5.bias"]


# ---------------------------------------------------------------- refused in one line

REFERENCE = randomized(SMALL_CNN3).state_dict()
ON_META = {k: torch.empty_like(v, device="meta") if k in ("features.0.weight", "classifier.5.bias") else v
           for k, v in tiny_model().state_dict().items()}


def weights(**changes):
    """SMALL_CNN3's state_dict with tensors replaced (None: removed)."""
    return {k: v for k, v in {**REFERENCE, **changes}.items() if v is not None}


def ours(**changes):
    return {**make_checkpoint(randomized(SMALL_CNN3), "cnn3", SMALL_CNN3), **changes}


def pre_1_6_declaring_8_gib(path):
    torch.save({"w": torch.zeros(10000)}, path, _use_new_zipfile_serialization=False)
    data = path.read_bytes()
    numel = data.index(b"M\x10\x27")  # BININT2 10000, the storage's declared size
    path.write_bytes(data[:numel] + b"J" + struct.pack("<i", 2**31 - 1) + data[numel + 3:])


def truncated(path):
    save_checkpoint(ours(), path)
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


# name -> (what torch.save writes, or a function that writes the file; what the line says[; load_checkpoint's keywords])
REFUSED = {
    "missing": (lambda path: None, "not found"),
    "a folder": (lambda path: path.mkdir(), "not a file"),
    "empty": (lambda path: path.write_bytes(b""), "not a PyTorch checkpoint"),
    "text": (lambda path: path.write_bytes(b"epoch,loss\n1,0.5\n"), "not a PyTorch checkpoint"),
    "random bytes": (lambda path: path.write_bytes(random.Random(0).randbytes(4096)), "not a PyTorch checkpoint"),
    "truncated": (truncated, "truncated or corrupt"),
    "a list": ([1, 2, 3], "not model weights"),
    "no weights": ({"epoch": 3, "optimizer": {}}, "no model weights"),
    "newer format": (ours(format_version=checkpoint.FORMAT_VERSION + 1), "newer than this tool"),
    "ours without weights": (ours(model=None), "field 'model'"),
    "a string among the tensors": (ours(model=weights(note="trained on Tuesday")), "field 'model'"),
    "pre-1.6 declaring 8 GiB": (pre_1_6_declaring_8_gib, "declares 8,192 MiB"),
    "over --max-params": (ours(arch_kwargs={**SMALL_CNN3, "hidden": 10**6}), "; the limit is 1,000 (--max-params)",
                          {"max_params": 1000}),
    # a conv width, a statistic, a hidden width, a head: one damaged tensor must not hide the whole arch
    **{f"{key} {bad}": (weights(**{key: torch.zeros(bad)}),
                        f"{key} has shape {bad}, expected {tuple(REFERENCE[key].shape)}")
       for key, bad in [("features.0.weight", (33, 1, 3, 3)), ("features.5.running_var", (63,)),
                        ("classifier.2.weight", (128, 100)), ("classifier.5.bias", (11,))]},
    "ours, wrong shape": (ours(model=weights(**{"classifier.5.weight": torch.zeros(10, 7)})),
                          "classifier.5.weight has shape (10, 7), expected (10, 128)"),
    "a missing tensor": (weights(**{"features.1.running_var": None}), "features.1.running_var"),
    **{f"{dtype}": (ours(model=weights(**{"features.0.weight": torch.zeros(16, 1, 3, 3, dtype=dtype)})),
                    f"features.0.weight holds {dtype} values, expected floating-point")
       for dtype in (torch.int64, torch.uint8, torch.bool, torch.complex64)},
    # what saving a model built under torch.device("meta") without loading its weights gives
    **{f"meta, {fmt}": (wrap(ON_META), f"field '{where}features.0.weight' is a meta-device tensor (and 1 more)")
       for fmt, where, wrap in [
           ("bare", "", lambda w: w), ("state_dict", "state_dict.", lambda w: {"state_dict": w}),
           ("ours", "model.", lambda w: {**make_checkpoint(tiny_model(), "cnn3", TINY), "model": w}),
           ("model_state_dict", "model_state_dict.", lambda w: {"model_state_dict": w})]},
    # a head for another class count, named by the field that set it, else by the head's tensor
    **{f"{n} classes, {fmt}": (make(tiny_model(num_classes=n)), f"field '{where}' gives the model {n} output classes")
       for n in (11, 2) for fmt, where, make in [
           ("ours", "arch_kwargs.num_classes", lambda m, n=n: make_checkpoint(m, "cnn3", {**TINY, "num_classes": n})),
           ("bare", "classifier.5.weight", lambda m: m.state_dict()),
           ("model_state_dict", "model_state_dict.classifier.5.weight", lambda m: {"model_state_dict": m.state_dict()}),
           ("module.", "classifier.5.weight", lambda m: {"module." + k: v for k, v in m.state_dict().items()})]},
}


@pytest.mark.parametrize("case", list(REFUSED))
def test_refused_in_one_line_that_names_the_file(tmp_path, case):
    content, expected, *keywords = REFUSED[case]
    path = tmp_path / "c.pt"
    if callable(content):
        content(path)
    else:
        torch.save(content, path)
    message = refused(path, **(keywords[0] if keywords else {}))
    assert expected in message, message


# ---------------------------------------------------------------- atomic save

def fill_up(monkeypatch, room):
    """os.fdopen's files from now on are on a disk with `room` bytes left: a write beyond them fails."""
    class FillsUp(WrappedFile):
        def write(self, data):
            nonlocal room
            if memoryview(data).nbytes > room:
                raise OSError(errno.ENOSPC, ENOSPC)
            room -= memoryview(data).nbytes
            return super().write(data)
    monkeypatch.setattr(os, "fdopen", lambda fd, mode, real_fdopen=os.fdopen: FillsUp(real_fdopen(fd, mode)))


def half_then(error):
    def write(fh):
        fh.write(b"half a checkpoint")
        raise error
    return write


ENOSPC = "No space left on device"


@pytest.mark.parametrize("write, room, raised, reason", [
    (half_then(RuntimeError("crash mid-write")), None, RuntimeError, None),  # a bug: its traceback helps
    (half_then(KeyboardInterrupt()), None, KeyboardInterrupt, None),
    (half_then(OSError(errno.EIO, "Input/output error")), None, UserError, "Input/output error"),
    (lambda fh: torch.save(ours(), fh), 0, UserError, ENOSPC),  # torch passes the OSError on
    (lambda fh: torch.save(ours(), fh), 3000, UserError, ENOSPC),  # torch turns it into its own "file write failed"
    (lambda fh: fh.write(b'{"finished": false}'), 5, UserError, ENOSPC),  # what save_json writes
], ids=["bug", "ctrl-c", "eio", "torch.save-first-write", "torch.save-mid-archive", "json"])
def test_failed_write_keeps_the_old_file_and_no_temp(tmp_path, monkeypatch, write, room, raised, reason):
    target = tmp_path / "run" / "best.pt"
    save_checkpoint(ours(), target)  # into a folder it makes
    before = target.read_bytes()
    if room is not None:
        fill_up(monkeypatch, room)
    with pytest.raises(raised) as err:
        checkpoint.atomic_write(target, write)
    assert reason is None or str(err.value) == f"cannot write {target}: {reason}"
    assert target.read_bytes() == before
    assert [p.name for p in target.parent.iterdir()] == ["best.pt"]  # no temporary file, after either write


# ---------------------------------------------------------------- strict JSON

def test_json_nonfinite_becomes_null_with_its_path(tmp_path):
    metrics = {"finished": False, "test_loss": float("nan"), "best": {"val_loss": float("inf"), "val_acc": 0.9},
               "history": [{"epoch": 1, "val_loss": 0.5}, {"epoch": 2, "val_loss": float("-inf")}],
               "epoch_s": (1.5, float("nan"))}
    save_json(metrics, tmp_path / "metrics.json")
    loaded = json.loads((tmp_path / "metrics.json").read_text(), parse_constant=lambda c: pytest.fail(f"{c} in JSON"))
    assert loaded["test_loss"] is None and loaded["best"] == {"val_loss": None, "val_acc": 0.9}
    assert loaded["history"][1] == {"epoch": 2, "val_loss": None} and loaded["epoch_s"] == [1.5, None]
    assert loaded["nonfinite"] == {"test_loss": "was NaN", "best.val_loss": "was Infinity",
                                   "history[1].val_loss": "was -Infinity", "epoch_s[1]": "was NaN"}
    assert metrics["test_loss"] != metrics["test_loss"]  # the caller's dict is left as it was
    summary = {"passed": True, "checks": [{"name": "load", "data": {"accuracy": 0.9133, "n": 3}}], "x": None}
    save_json(summary, tmp_path / "s.json")  # without a non-finite value: as json.dumps writes it
    assert (tmp_path / "s.json").read_text() == json.dumps(summary, indent=2) + "\n"


@pytest.mark.parametrize("obj, folder, error, message", [
    ([float("nan")], "", ValueError, None),  # non-finite values are recorded only in a dict
    ({"nonfinite": 1, "loss": float("inf")}, "", ValueError, None),  # ... without a "nonfinite" key
    ({"x": 1}, "a-file", UserError, r"^cannot write .*a-file/x\.json: "),  # a folder that cannot be made: one line
])
def test_save_json_refuses_and_writes_nothing(tmp_path, obj, folder, error, message):
    (tmp_path / "a-file").write_text("")
    with pytest.raises(error, match=message):
        save_json(obj, tmp_path / folder / "x.json")
    assert not (tmp_path / folder / "x.json").exists()

"""Checkpoints: every format users already have loads with identical predictions; unsafe or bad files
are refused with one clear line; saving is atomic."""

import os

import pytest
import torch

from fashion_ft.checkpoint import (
    FORMAT_VERSION,
    atomic_write,
    load_checkpoint,
    make_checkpoint,
    nonfinite_tensors,
    save_checkpoint,
)
from fashion_ft.errors import UserError
from fashion_ft.model import ARCHS, build_model

DEFAULT_WIDTH = {k: ARCHS["cnn3"].default_kwargs[k] for k in ("channels", "hidden")}
EARLIER_BASE_WIDTH = {"channels": [32, 64, 128], "hidden": 256}  # the shipped base model until 2026-11-28
NARROW = {"channels": [16, 32, 64], "hidden": 128}


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


@pytest.fixture(params=[DEFAULT_WIDTH, EARLIER_BASE_WIDTH, NARROW], ids=["default-width", "earlier-base", "narrow"])
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
    ckpt = make_checkpoint(randomized(NARROW), "cnn3", NARROW)
    ckpt["format_version"] = FORMAT_VERSION + 1
    torch.save(ckpt, tmp_path / "future.pt")
    with pytest.raises(UserError, match="newer than this tool"):
        load_checkpoint(tmp_path / "future.pt")


def test_our_checkpoint_loads_with_plain_weights_only(tmp_path):
    save_checkpoint(make_checkpoint(randomized(NARROW), "cnn3", NARROW, metrics={"val_acc": 0.9}), tmp_path / "c.pt")
    # no fashion_ft needed to read it: anyone's torch.load(weights_only=True) works
    raw = torch.load(tmp_path / "c.pt", weights_only=True)
    assert raw["arch"] == "cnn3" and raw["arch_kwargs"]["channels"] == NARROW["channels"]
    assert raw["metrics"] == {"val_acc": 0.9} and "features.0.weight" in raw["model"]


def test_our_checkpoint_without_arch_falls_back_to_inference(tmp_path):
    ckpt = make_checkpoint(randomized(NARROW), "cnn3", NARROW)
    del ckpt["arch"], ckpt["arch_kwargs"]
    torch.save(ckpt, tmp_path / "c.pt")
    assert load_checkpoint(tmp_path / "c.pt").arch_kwargs["channels"] == NARROW["channels"]


def test_our_format_without_weights_is_a_user_error(tmp_path):
    ckpt = make_checkpoint(randomized(NARROW), "cnn3", NARROW)
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
    state_dict = randomized(NARROW).state_dict()
    good_shape = tuple(state_dict[key].shape)
    state_dict[key] = torch.zeros(bad_shape)
    torch.save(state_dict, tmp_path / "c.pt")
    with pytest.raises(UserError) as err:
        load_checkpoint(tmp_path / "c.pt")
    assert f"{key} has shape {bad_shape}, expected {good_shape}" in str(err.value)


def test_wrong_shape_in_our_format_names_the_key(tmp_path):
    ckpt = make_checkpoint(randomized(NARROW), "cnn3", NARROW)
    ckpt["model"]["classifier.5.weight"] = torch.zeros(10, 7)
    torch.save(ckpt, tmp_path / "c.pt")
    with pytest.raises(UserError, match=r"classifier.5.weight has shape \(10, 7\), expected \(10, 128\)"):
        load_checkpoint(tmp_path / "c.pt")


def test_nonfinite_tensors_are_named():
    state_dict = randomized(NARROW).state_dict()
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
        save_checkpoint(make_checkpoint(randomized(NARROW), "cnn3", NARROW), path)
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


@pytest.mark.parametrize("error, raised", [
    (RuntimeError("crash mid-write"), RuntimeError),
    (OSError(28, "No space left on device"), UserError),  # disk full: a user problem, one line
    (KeyboardInterrupt(), KeyboardInterrupt),
])
def test_failed_write_keeps_old_file_and_no_temp(tmp_path, error, raised):
    target = tmp_path / "best.pt"
    save_checkpoint({"version": torch.tensor(1)}, target)
    old_bytes = target.read_bytes()

    def write_half_then_fail(fh):
        fh.write(b"half a checkpoint")
        raise error

    with pytest.raises(raised):
        atomic_write(target, write_half_then_fail)
    assert target.read_bytes() == old_bytes
    assert [p.name for p in tmp_path.iterdir()] == ["best.pt"]

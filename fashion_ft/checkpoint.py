"""Checkpoints: atomic save, safe load, and the formats users already have.

Saving writes a temporary file in the target folder and `os.replace`s it (as timm's CheckpointSaver
does), so a crash, Ctrl-C or kill -9 leaves either the old or the new complete file. Loading uses
`torch.load(weights_only=True)`; unpickling arbitrary objects (a whole pickled nn.Module) runs code
and happens only when the caller passes trust_pickle=True on the user's explicit request. Every field
the tools read is checked at load, and a bad one is named in one line with the file and its key path
("checkpoint field 'normalize.std' must be ..."), so nothing fails later inside training or evaluation.
"""

import datetime
import errno
import json
import math
import os
import pickle
import re
import shutil
import tempfile
import warnings
import zipfile
from contextlib import suppress
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from . import userdef
from .config import MAX_PARAMETERS, NORMALIZE_MAX_MEAN, NORMALIZE_MIN_STD, normalize_ok
from .data import CLASSES, MEAN, STD, VALIDATION_SOURCES
from .errors import UserError, first_line
from .model import (
    ARCHS,
    NUM_CLASSES,
    USER_ARCH,
    build_model,
    build_source,
    check_outputs,
    infer_arch,
    on_meta,
    output_classes,
    resolve_arch_kwargs,
    shape_mismatches,
    unwrap,
)
from .signals import deferred

FORMAT = "fashion_ft.checkpoint"
FORMAT_VERSION = 1
WRAPPER_KEYS = ("model_state_dict", "state_dict", "model")
PREFIXES = re.compile(r"^(?:module\.|_orig_mod\.)+")  # DataParallel/DDP, torch.compile, nested either way
TRUST_HINT = "pass --trust-pickle only if you trust where this file came from"
RESUME_HINT = "--resume never unpickles: a last.pt this tool wrote holds none"
# torch.save stores a zip's entries uncompressed, so they add up to less than the file; slack for other writers
DECLARED_SLACK_BYTES = 64 << 20
FULL_DISK_BYTES = 1 << 20  # less free space than this after a failed write: the disk filled up
WRITE_ERRNO_MESSAGES = {
    errno.ENOSPC: "no space left on device while writing {path}",
    errno.EDQUOT: "disk quota exceeded while writing {path}",
    errno.EFBIG: "file too large while writing {path}: the file-size limit (ulimit -f) is smaller",
}


# ---------------------------------------------------------------- saving

class _CauseKeeper:
    """A binary file that remembers why a write failed: torch.save's C++ writer reports a failed Python
    write (a full disk, the file-size limit, a signal) as its own RuntimeError, and the cause is lost."""

    def __init__(self, fh):
        self.fh, self.flush, self.cause = fh, fh.flush, None

    def write(self, data) -> int:
        try:
            return self.fh.write(data)
        except BaseException as exc:
            self.cause = exc
            raise


def atomic_write(path, write) -> None:
    with deferred():  # a signal never tears a save: it is honoured once the file is in place
        _atomic_write(path, write)


def _atomic_write(path, write) -> None:
    """Call write(binary file) on a temporary file beside `path`, fsync, then rename it into place.

    A failure leaves the previous file untouched and no temporary file; a full disk or another
    file-system failure becomes one UserError line naming `path`; a signal stays the signal.
    """
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    except OSError as exc:
        raise UserError(_write_failure(exc, path)) from None
    keeper = None
    try:
        with os.fdopen(fd, "wb") as fh:
            keeper = _CauseKeeper(fh)
            write(keeper)
            fh.flush()
            os.fsync(fh.fileno())
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException as exc:
        cause = getattr(keeper, "cause", None) or exc
        message = _write_failure(cause, path)  # before the unlink: the temp file is what filled the disk
        with suppress(OSError):
            os.unlink(tmp)
        if message is None:
            raise cause from None
        raise UserError(message) from None


def _disk_full(folder: Path) -> bool:
    try:
        return shutil.disk_usage(folder).free < FULL_DISK_BYTES
    except OSError:
        return False


def _write_failure(exc: BaseException, path: Path) -> str | None:
    """The one-line message for a failed write, or None for an error that is not the file system's.

    torch.save reports a failed write of its zip container as a RuntimeError from inline_container.cc
    ("file write failed", "unexpected pos ..."), not as an OSError, so for those the free space of the
    folder tells whether the disk filled up.
    """
    if isinstance(exc, OSError):
        message = WRITE_ERRNO_MESSAGES.get(exc.errno, "cannot write {path}: {reason}")
        return message.format(path=path, reason=exc.strerror or exc)
    if not isinstance(exc, RuntimeError):
        return None
    text = str(exc)
    if "No space left on device" in text or _disk_full(path.parent):
        return WRITE_ERRNO_MESSAGES[errno.ENOSPC].format(path=path)
    if "inline_container.cc" in text or "file write failed" in text:
        return f"cannot write {path}: torch could not write the file ({first_line(exc, sentence=True)})"
    return None


def save_checkpoint(obj: dict, path) -> None:
    atomic_write(path, lambda fh: torch.save(obj, fh))


def _nonfinite_to_null(value, where: str, found: dict):
    if isinstance(value, float) and not math.isfinite(value):
        found[where] = "was NaN" if math.isnan(value) else f"was {'-' if value < 0 else ''}Infinity"
        return None
    if isinstance(value, dict):
        return {k: _nonfinite_to_null(v, f"{where}.{k}" if where else str(k), found) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_nonfinite_to_null(v, f"{where}[{i}]", found) for i, v in enumerate(value)]
    return value


def strict_json(obj: dict) -> dict:
    """A copy of `obj` that strict JSON can hold: every NaN, Infinity or -Infinity becomes null.

    When there was one, the copy gains a top-level key "nonfinite" mapping each such value's key path
    (dots between keys, [i] for list items: "history[2].val_loss") to what it was ("was NaN"), so a
    reader can tell a missing value from a diverged one. JSON has no NaN; Python's json module writes
    one by default, which other readers (jq, JavaScript, pandas' strict mode) refuse.
    """
    found = {}
    clean = _nonfinite_to_null(obj, "", found)
    if not found:
        return clean
    if not isinstance(clean, dict) or "nonfinite" in clean:
        raise ValueError("non-finite values can be recorded only in a dict without a 'nonfinite' key")
    return {**clean, "nonfinite": found}


def save_json(obj: dict, path) -> None:
    """Write `obj` as strict JSON (see strict_json), indented, with a final newline, atomically."""
    text = json.dumps(strict_json(obj), indent=2, allow_nan=False) + "\n"
    atomic_write(path, lambda fh: fh.write(text.encode()))


def make_checkpoint(model, arch, arch_kwargs, *, normalize=(MEAN, STD), metrics=None, config=None, history=None,
                    split: dict | None = None, model_def: dict | None = None) -> dict:
    """The checkpoint dict that every tool of this project reads, loadable with torch.load(weights_only=True).

    `model` is the module or its state_dict (the weights alone, e.g. a best model's kept copy). `split`
    records the validation split the weights were trained with ({seed, val_size, fingerprint}); None
    (unknown) leaves it out. `model_def` records a user's class (userdef.ModelDef.to_dict()), whose
    constructor takes `arch_kwargs`.
    """
    weights = model if isinstance(model, dict) else unwrap(model).state_dict()
    ckpt = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "arch": arch,
        "arch_kwargs": dict(arch_kwargs),
        "model": {k: v.detach().cpu().contiguous() for k, v in weights.items()},  # channels_last -> NCHW
        "classes": list(CLASSES),
        "normalize": {"mean": float(normalize[0]), "std": float(normalize[1])},
        "metrics": dict(metrics or {}),
        "config": dict(config or {}),
        "history": list(history or []),
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "torch_version": str(torch.__version__),
    }
    if split is not None:
        ckpt["split"] = dict(split)
    if model_def is not None:
        ckpt["model_def"] = dict(model_def)
    return ckpt


# ---------------------------------------------------------------- field checks

class _BadField(Exception):
    """A checkpoint field that is missing or has the wrong type or value; the loader adds the file."""

    def __init__(self, name: str, problem: str):
        super().__init__(f"checkpoint field {name!r} {problem}")


def _require(ok: bool, name: str, problem: str) -> None:
    if not ok:
        raise _BadField(name, problem)


def _show(value) -> str:
    if value is None or isinstance(value, (bool, int, float, str)):
        text = repr(value)
        return text if len(text) <= 40 else text[:37] + "..."
    size = f" of {len(value)}" if isinstance(value, (list, tuple, dict)) else ""
    return f"a {type(value).__name__}{size}"


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _is_state_dict(obj) -> bool:
    return isinstance(obj, dict) and bool(obj) and all(isinstance(v, torch.Tensor) for v in obj.values())


DICT = ("a dict with text keys", lambda v: isinstance(v, dict) and all(isinstance(k, str) for k in v))
TEXT = ("text", lambda v: isinstance(v, str))
TEXT_OR_NONE = ("text or None", lambda v: v is None or isinstance(v, str))
COUNT = ("a whole number >= 0", lambda v: _is_int(v) and v >= 0)
FINITE = ("a finite number", lambda v: _is_number(v) and math.isfinite(v))
WEIGHTS = ("a state_dict (names to tensors)", _is_state_dict)
BEST = ("a number or None", lambda v: v is None or _is_number(v))  # +-inf or NaN after a diverged epoch

# The fields of our format that the tools read: key path -> (what it must be, test), checked in this order
# by one loop ("[]": every item of a list). An absent field keeps its default (older files), except those
# in REQUIRED, which a present parent must hold.
FIELDS = {
    "arch": TEXT_OR_NONE,  # None: inferred from the weights
    "arch_kwargs": DICT,
    "normalize": DICT,
    "normalize.mean": (f"a number with |mean| <= {NORMALIZE_MAX_MEAN:g}", lambda v: normalize_ok(v, 1.0)),
    "normalize.std": (f"a finite number >= {NORMALIZE_MIN_STD:g} (images are divided by it)",
                      lambda v: normalize_ok(0.0, v)),
    "classes[]": ("a class name", lambda v: isinstance(v, str) and bool(v)),
    "classes": (f"a list of {NUM_CLASSES} different class names (Fashion-MNIST's)",
                lambda v: isinstance(v, (list, tuple)) and len(v) == NUM_CLASSES == len(set(map(repr, v)))),
    "metrics": DICT,
    "config": DICT,
    "history": ("a list of per-epoch dicts", lambda v: isinstance(v, list)),
    "history[]": DICT,
    "split": ("a dict, or None when not recorded", lambda v: v is None or DICT[1](v)),
    "split.seed": ("a whole number in 0..2**64-1", lambda v: _is_int(v) and 0 <= v < 2**64),
    "split.val_size": ("a whole number >= 1", lambda v: _is_int(v) and v >= 1),
    "split.fingerprint": ("the training files' fingerprint (text), or None",
                          lambda v: v is None or (isinstance(v, str) and v != "")),
    "split.validation": (f"one of {', '.join(VALIDATION_SOURCES)}", lambda v: v in VALIDATION_SOURCES),
    "kind": TEXT,
    "model_def": DICT,
    "model_def.given": TEXT,
    "model_def.class": TEXT,
    "model_def.resolved": TEXT_OR_NONE,
    "model_def.sha256": TEXT_OR_NONE,
    "teachers": ("a list of {path, sha256}", lambda v: isinstance(v, list) and all(
        isinstance(r, dict) and isinstance(r.get("path"), str) and isinstance(r.get("sha256"), str) for r in v)),
}
# What resuming reads from a last.pt besides; `scaler` is {} for a run without a GradScaler (CPU, bf16), and
# `selection` (older files: absent) falls back to `early_stopping`.
RESUME_FIELDS = {
    "arch": TEXT,
    "model": WEIGHTS,
    "optimizer": DICT,
    "optimizer.state": ("a dict", lambda v: isinstance(v, dict)),
    "optimizer.param_groups": ("a non-empty list of dicts",
                               lambda v: isinstance(v, list) and bool(v) and all(isinstance(g, dict) for g in v)),
    "schedulers": DICT,
    "schedulers.per_batch": ("a dict", lambda v: isinstance(v, dict)),
    "schedulers.plateau": ("a dict or None", lambda v: v is None or isinstance(v, dict)),
    "scaler": DICT,
    **{f"{name}{key}": rule for name in ("early_stopping", "selection")
       for key, rule in (("", DICT), (".best", BEST), (".best_epoch", COUNT), (".bad_epochs", COUNT))},
    "best_model": WEIGHTS,
    "history[].epoch": ("a whole number", _is_int),
    "epoch": COUNT,
    "run_name": TEXT,
    "ema": ("a state_dict, or None without --ema-decay", lambda v: v is None or _is_state_dict(v)),
}
REQUIRED = {"split.seed", "split.val_size", "model_def.given", "model_def.class"}
# A tracker's best is None before its first epoch; a last.pt without `ema` kept no moving average.
RESUME_REQUIRED = REQUIRED | {"arch_kwargs", "normalize", "config", "history"} | (
    RESUME_FIELDS.keys() - {"selection", "early_stopping.best", "selection.best", "schedulers.plateau", "ema"})


def _found(obj, keys: list[str], name: str, required: bool):
    """(key path, value) of each value at `keys` below obj; a missing one only when `required`."""
    if not keys:
        yield name, obj
    elif keys[0] == "[]":
        for i, item in enumerate(obj if isinstance(obj, (list, tuple)) else ()):
            yield from _found(item, keys[1:], f"{name}[{i}]", required)
    elif isinstance(obj, dict):
        child = f"{name}.{keys[0]}" if name else keys[0]
        if keys[0] in obj:
            yield from _found(obj[keys[0]], keys[1:], child, required)
        elif required and len(keys) == 1:
            raise _BadField(child, "is missing")


def _check_fields(meta: dict, fields: dict, required: set) -> None:
    for path, (what, ok) in fields.items():
        for name, value in _found(meta, path.replace("[]", ".[]").split("."), "", path in required):
            _require(ok(value), name, f"must be {what}, got {_show(value)}")


def _check_tensors(state_dict: dict, where: str) -> None:
    """Weights must hold values: a meta-device tensor (from a model built on torch.device("meta")
    and saved before its weights were loaded) has a shape and no data."""
    empty = [k for k, v in state_dict.items() if v.is_meta]
    if empty:
        more = f" (and {len(empty) - 1} more)" if len(empty) > 1 else ""
        raise _BadField(f"{where}{empty[0]}", f"is a meta-device tensor{more}: a shape without values; save the "
                        "model after its weights were loaded")


# ---------------------------------------------------------------- loading

@dataclass
class LoadedCheckpoint:
    path: Path
    source_format: str  # how the weights were stored, for the user
    arch: str
    arch_kwargs: dict
    state_dict: dict
    mean: float = MEAN
    std: float = STD
    classes: list = field(default_factory=lambda: list(CLASSES))
    meta: dict = field(default_factory=dict)  # the whole file when it is one of ours
    unpickled: bool = False  # read with weights_only=False (--trust-pickle): code in the file may have run
    model_def: userdef.ModelDef | None = None  # the user's class, built with arch_kwargs
    container: str | None = None  # where the weights sat: None (bare state_dict), a key, or FORMAT (ours)
    sha256: str | None = None  # of the file, where a caller records it (a teacher)

    @property
    def normalize_recorded(self) -> bool:
        return "normalize" in self.meta

    def build(self) -> nn.Module:
        model = build_source(self.arch, self.arch_kwargs, self.model_def)
        model.load_state_dict(self.state_dict)
        return model

    @property
    def split(self) -> dict | None:
        """The recorded validation split {seed, val_size, fingerprint}, or None: an older file or a model
        from elsewhere (a record that is not valid was refused at load)."""
        value = self.meta.get("split")
        return dict(value) if isinstance(value, dict) else None


def _check_readable(path: Path) -> None:
    if not path.exists():
        raise UserError(f"checkpoint not found: {path}")
    if not path.is_file():
        raise UserError(f"checkpoint is not a file: {path}")
    if not os.access(path, os.R_OK):
        raise UserError(f"checkpoint is not readable (permissions): {path}")
    if path.stat().st_size == 0:
        raise UserError(f"checkpoint is empty (0 bytes): {path}")


def _refuse_other_files(path: Path) -> None:
    """torch.save writes a zip archive (before torch 1.6: a pickle, which starts with the PROTO opcode);
    torch.jit.save writes a zip like it, with compiled code and a constants.pkl beside the data. torch.load
    allocates the size that the file declares for each tensor before reading it, so a file that declares
    far more than it holds is refused unread: torch.save stores a zip's entries uncompressed."""
    with open(path, "rb") as fh:
        start = fh.read(4)
    if start[:1] != b"\x80" and start != b"PK\x03\x04":  # a truncated zip still starts like one
        raise UserError(f"{path} is not a PyTorch checkpoint (neither a zip archive nor a pickle)")
    declared = 0
    with suppress(zipfile.BadZipFile, OSError), zipfile.ZipFile(path) as archive:
        if any(name.split("/", 1)[-1] == "constants.pkl" for name in archive.namelist()):
            raise UserError(f"{path} is a TorchScript archive (torch.jit.save), not a checkpoint of weights; save its "
                            f"state_dict once with: python -c \"import torch; torch.save(torch.jit.load('{path}')"
                            ".state_dict(), 'weights.pt')\" and use weights.pt")
        declared = sum(entry.file_size for entry in archive.infolist())
    if start[:1] == b"\x80":
        declared = _legacy_storage_bytes(path)
    size = path.stat().st_size
    if declared > size + DECLARED_SLACK_BYTES:
        raise UserError(f"{path} declares {declared / 2**20:,.0f} MiB of data in a file of {size:,} bytes: it is "
                        "damaged or crafted, and was not loaded")


def _legacy_storage_bytes(path: Path) -> int:
    """The bytes that the tensors of a pre-1.6 file declare: its pickle read with the tensors on the meta
    device (FakeTensorMode), where torch's loader allocates nothing; 0 when it cannot be read that way (the
    real load then says why)."""
    from torch._subclasses.fake_tensor import FakeTensorMode  # about a second to import: old files only

    def tensors(obj):
        if isinstance(obj, torch.Tensor):
            yield obj
        for item in obj.values() if isinstance(obj, dict) else obj if isinstance(obj, (list, tuple)) else ():
            yield from tensors(item)

    try:
        with FakeTensorMode(), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            obj = torch.load(path, map_location="cpu", weights_only=True)
        return sum({t.untyped_storage()._cdata: t.untyped_storage().nbytes() for t in tensors(obj)}.values())
    except Exception:
        return 0


def _torch_load(path: Path, trust_pickle: bool, refusal_hint: str) -> tuple[object, bool]:
    """(what the file holds, whether it was unpickled as trusted)."""
    try:
        _refuse_other_files(path)
        with warnings.catch_warnings():  # torch warns about pickle protocols it then refuses anyway
            warnings.simplefilter("ignore", UserWarning)
            return torch.load(path, map_location="cpu", weights_only=True), False
    except UserError:
        raise
    except pickle.UnpicklingError as exc:
        if "Weights only load failed" not in str(exc):
            raise UserError(f"{path} is not a readable PyTorch checkpoint (truncated or corrupt?)") from None
        if not trust_pickle:
            raise UserError(f"{path} holds pickled Python objects, not just weights; loading it would run code from "
                            f"the file, so it was refused ({refusal_hint})") from None
    except Exception as exc:  # garbage makes the unpickler fail with any type (KeyError, IndexError, ...)
        raise UserError(
            f"{path} is not a readable PyTorch checkpoint (truncated or corrupt?): {first_line(exc, sentence=True)}"
        ) from None
    try:
        return torch.load(path, map_location="cpu", weights_only=False), True  # user passed --trust-pickle
    except Exception as exc:
        raise UserError(f"{path} could not be unpickled even as trusted: {first_line(exc, sentence=True)}") from None


def strip_prefixes(state_dict: dict) -> dict:
    return {PREFIXES.sub("", key): value for key, value in state_dict.items()}


@dataclass
class _Extracted:
    state_dict: dict
    source_format: str
    meta: dict  # our metadata, or {} for other formats
    where: str = ""  # the key path of the weights inside the file, for error messages


def _extract(obj) -> _Extracted:
    """The weights and our metadata from whatever torch.load returned."""
    if isinstance(obj, nn.Module):
        return _Extracted(obj.state_dict(), "pickled nn.Module (trusted)", {})
    if isinstance(obj, dict) and obj.get("format") == FORMAT:
        version = obj.get("format_version")
        if not isinstance(version, int) or version > FORMAT_VERSION:
            raise UserError(f"checkpoint format version {version} is newer than this tool reads ({FORMAT_VERSION}); "
                            "upgrade fashion_ft")
        weights = obj.get("model")
        if not _is_state_dict(weights):
            odd = next((k for k, v in weights.items() if not isinstance(v, torch.Tensor)), None) \
                if isinstance(weights, dict) and weights else None
            raise UserError(f"checkpoint field 'model.{odd}' must be a tensor, got {_show(weights[odd])}" if odd is not None
                            else f"checkpoint in {FORMAT} format holds no model weights under 'model'")
        return _Extracted(obj["model"], f"{FORMAT} v{version}", obj, "model.")
    if _is_state_dict(obj):
        return _Extracted(obj, "bare state_dict", {})
    if not isinstance(obj, dict):
        raise UserError(f"checkpoint holds a {type(obj).__name__}, not model weights")
    for key in WRAPPER_KEYS:
        inner = obj.get(key)
        if isinstance(inner, nn.Module):
            return _Extracted(inner.state_dict(), f"dict with a pickled nn.Module under {key!r} (trusted)", {})
        if _is_state_dict(inner):
            return _Extracted(inner, f"dict with state_dict under {key!r}", {}, f"{key}.")
    keys = ", ".join(map(str, list(obj)[:6]))
    raise UserError(f"no model weights found in the checkpoint (its top-level keys: {keys})")


def _resolve_arch(found: _Extracted, state_dict: dict, max_params: int) -> tuple[str, dict]:
    """(arch, kwargs) named by our file and checked against its weights, or inferred from the weights. The
    model must predict exactly the 10 Fashion-MNIST classes; the error names the field that set the count,
    else the head's weight in the file."""
    arch, set_by = found.meta.get("arch"), None
    if arch is None:
        arch, arch_kwargs = infer_arch(state_dict)
    else:
        _require(arch in ARCHS, "arch", f"names an unknown arch {arch!r}; known: {', '.join(sorted(ARCHS))}")
        arch_kwargs = resolve_arch_kwargs(arch, found.meta.get("arch_kwargs") or {})
        if "num_classes" in found.meta.get("arch_kwargs", {}):
            set_by = "arch_kwargs.num_classes"
    model = on_meta(lambda: build_model(arch, arch_kwargs), max_params)
    problems = shape_mismatches(model, state_dict)
    if problems:
        raise UserError(f"weights do not match arch {arch}: {'; '.join(problems)}")
    outputs, head = output_classes(model)
    _require(outputs == NUM_CLASSES, set_by or f"{found.where}{head}",
             f"gives the model {outputs} output classes, Fashion-MNIST has {NUM_CLASSES}")
    return arch, arch_kwargs


def _fit_keys(model: nn.Module, state_dict: dict) -> dict:
    """The weights under the key names of the user's class: as saved when they match it, else without
    the DataParallel/compile prefixes (a leading `module.` may be a real attribute of the class)."""
    expected = set(model.state_dict())
    if set(state_dict) == expected:
        return state_dict
    stripped = strip_prefixes(state_dict)
    return stripped if len(expected & set(stripped)) > len(expected & set(state_dict)) else state_dict


def _user_source(found: _Extracted, path: Path, definition, kwargs, max_params: int):
    """(kwargs, weights under its keys) of a user's class, checked against the weights: the shapes on the meta
    device first, so that a recorded width cannot take the memory."""
    if definition is None:
        raise userdef.refusal(found.meta["model_def"], str(path))
    kwargs = dict(found.meta.get("arch_kwargs") or {}) if kwargs is None else dict(kwargs)
    name = f"{definition.given}:{definition.cls}"
    shapes = on_meta(lambda: userdef.build(definition, kwargs), max_params)
    state_dict = _fit_keys(shapes, found.state_dict)
    problems = shape_mismatches(shapes, state_dict)
    if problems:
        raise UserError(f"the weights do not fit {name}: {'; '.join(problems[:3])}")
    check_outputs(userdef.build(definition, kwargs), name)
    return kwargs, state_dict


def load_checkpoint(path, trust_pickle: bool = False, refusal_hint: str = TRUST_HINT,
                    model_def: "userdef.ModelDef | None" = None, model_kwargs: dict | None = None,
                    max_params: int = MAX_PARAMETERS, ours_only: bool = False) -> LoadedCheckpoint:
    """Read, recognise and verify a checkpoint; every failure is a UserError with one clear line that
    names the file and, for a bad field, the field. `refusal_hint` ends the refusal of a pickle.
    `model_def` (--model-def) and `model_kwargs` name the user's class, for a file that records it or
    records no architecture; a file of one of ours is built from its record. Whatever architecture the
    file records is built on the meta device and matched against its weights before anything is
    allocated, and may have at most `max_params` parameters. `ours_only`: a file this tool wrote of one of
    our architectures, which records its normalisation (a teacher)."""
    path = Path(path)
    _check_readable(path)
    try:
        obj, unpickled = _torch_load(path, trust_pickle, refusal_hint)
        found = _extract(obj)
        _check_tensors(found.state_dict, found.where)
        _check_fields(found.meta, FIELDS, REQUIRED)
        if ours_only and (found.meta.get("model_def") is not None or found.meta.get("arch") not in ARCHS):
            raise UserError(f"only a checkpoint this tool wrote of one of its architectures ({', '.join(ARCHS)}) can "
                            "teach: it records its normalisation, and a class of your own runs only as the model "
                            "trained (--model-def)")
        definition = None
        if found.meta.get("model_def") is not None or (model_def is not None and not found.meta.get("arch")):
            definition, arch = model_def, USER_ARCH
            arch_kwargs, state_dict = _user_source(found, path, model_def, model_kwargs, max_params)
        else:
            state_dict = strip_prefixes(found.state_dict)
            arch, arch_kwargs = _resolve_arch(found, state_dict, max_params)
    except (UserError, _BadField) as exc:
        message = str(exc)
        raise UserError(message if message.startswith(str(path)) else f"{path}: {message}") from None
    norm = found.meta.get("normalize", {})
    return LoadedCheckpoint(
        path=path, source_format=found.source_format, arch=arch, arch_kwargs=arch_kwargs,
        state_dict=state_dict, mean=float(norm.get("mean", MEAN)), std=float(norm.get("std", STD)),
        classes=list(found.meta.get("classes", CLASSES)), meta=found.meta, unpickled=unpickled,
        model_def=definition, container=FORMAT if found.meta else (found.where[:-1] or None),
    )


# ---------------------------------------------------------------- resuming

def validate_resumable(path, meta: dict) -> None:
    """Check that `meta` (LoadedCheckpoint.meta of `path`) holds everything resuming a run reads; a
    missing or wrong field is one UserError line naming the file and the field."""
    if meta.get("kind") != "last":
        raise UserError(f"{path} is not a resumable checkpoint (its 'kind' is {_show(meta.get('kind'))}, not "
                        "'last'); resume from the last.pt a run wrote")
    try:
        _check_fields(meta, FIELDS | RESUME_FIELDS, RESUME_REQUIRED)
        for name in ("model", "best_model", "ema"):
            if meta.get(name) is not None:
                _check_tensors(meta[name], f"{name}.")
        model, best = meta["model"], meta["best_model"]
        odd = min(model.keys() ^ best.keys(), default=None) or next(
            (k for k in model if model[k].shape != best[k].shape), None)
        _require(odd is None, f"best_model.{odd}", "does not match the same tensor of 'model' (missing, extra or "
                 "another shape)")
    except _BadField as exc:
        raise UserError(f"{path}: {exc}; start a new run from its weights with --model-path instead") from None


def nonfinite_tensors(state_dict: dict) -> list[str]:
    return [k for k, v in state_dict.items() if v.is_floating_point() and not torch.isfinite(v).all()]

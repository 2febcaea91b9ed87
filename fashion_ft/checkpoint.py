"""Checkpoints: atomic save, safe load, and the formats users already have.

Saving writes a temporary file in the target folder, fsyncs it and `os.replace`s it, so a crash, Ctrl-C
or kill -9 leaves either the old or the new complete file. Loading uses `torch.load(weights_only=True)`;
unpickling arbitrary objects (a whole pickled nn.Module) runs code and happens only when the caller passes
trust_pickle=True on the user's explicit request. What a tool reads from a file is checked at load, what
--resume reads besides by validate_resumable: a bad field is one line naming the file and the field.
"""

import datetime
import json
import math
import os
import pickle
import re
import tempfile
import warnings
import zipfile
from contextlib import suppress
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from . import userdef
from .config import MAX_PARAMETERS, NORMALIZE_RULE, normalize_ok
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


# ---------------------------------------------------------------- saving

class _KeepsError:
    """A file that keeps the OSError of a failed write: torch.save's C++ writer reports it as its own
    RuntimeError ("file write failed"), which has lost the errno that says why."""

    def __init__(self, fh):
        self.fh, self.flush, self.error = fh, fh.flush, None

    def write(self, data) -> int:
        try:
            return self.fh.write(data)
        except OSError as exc:
            self.error = exc
            raise


def atomic_write(path, write) -> None:
    """Call write(binary file) on a temporary file beside `path`, fsync it, rename it into place. A failure
    leaves the old file whole and no temporary file, a file-system error as one UserError line; a signal
    waits until the write is over."""
    path, tmp, out = Path(path), None, None
    with deferred():
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
            with os.fdopen(fd, "wb") as fh:
                out = _KeepsError(fh)
                write(out)
                fh.flush()
                os.fsync(fh.fileno())
            os.chmod(tmp, 0o644)
            os.replace(tmp, path)
        except BaseException as exc:
            if tmp is not None:
                with suppress(OSError):
                    os.unlink(tmp)
            error = (out and out.error) or exc
            if isinstance(error, OSError):
                raise UserError(f"cannot write {path}: {error.strerror or error}") from None
            raise


def save_checkpoint(obj: dict, path) -> None:
    atomic_write(path, lambda fh: torch.save(obj, fh))


def strict_json(obj: dict) -> dict:
    """A copy of `obj` that strict JSON can hold (Python writes NaN, which jq, JavaScript and pandas' strict
    mode refuse): every NaN, Infinity or -Infinity becomes null, and a top-level "nonfinite" maps each one's
    key path ("history[2].val_loss") to what it was ("was NaN"), so that a reader can tell it from missing."""
    found = {}

    def clean(value, where: str):
        if isinstance(value, float) and not math.isfinite(value):
            found[where] = "was NaN" if math.isnan(value) else f"was {'-' if value < 0 else ''}Infinity"
            return None
        if isinstance(value, dict):
            return {k: clean(v, f"{where}.{k}" if where else str(k)) for k, v in value.items()}
        if isinstance(value, (list, tuple)):
            return [clean(v, f"{where}[{i}]") for i, v in enumerate(value)]
        return value

    copy = clean(obj, "")
    if not found:
        return copy
    if not isinstance(copy, dict) or "nonfinite" in copy:
        raise ValueError("non-finite values can be recorded only in a dict without a 'nonfinite' key")
    return {**copy, "nonfinite": found}


def save_json(obj: dict, path) -> None:
    """Write `obj` as strict JSON (see strict_json), indented, with a final newline, atomically."""
    text = json.dumps(strict_json(obj), indent=2, allow_nan=False) + "\n"
    atomic_write(path, lambda fh: fh.write(text.encode()))


def make_checkpoint(model, arch, arch_kwargs, *, normalize=(MEAN, STD), metrics=None, config=None, history=None,
                    split: dict | None = None, model_def: dict | None = None) -> dict:
    """The checkpoint dict that every tool of this project reads, loadable with torch.load(weights_only=True).
    `model`: the module or its state_dict; `split`: the validation split the weights were trained with
    ({seed, val_size, fingerprint, validation}); `model_def`: the user's class (userdef.ModelDef.to_dict())."""
    weights = model if isinstance(model, dict) else unwrap(model).state_dict()
    ckpt = {
        "format": FORMAT, "format_version": FORMAT_VERSION, "arch": arch, "arch_kwargs": dict(arch_kwargs),
        "model": {k: v.detach().cpu().contiguous() for k, v in weights.items()},  # channels_last -> NCHW
        "classes": list(CLASSES), "normalize": {"mean": float(normalize[0]), "std": float(normalize[1])},
        "metrics": dict(metrics or {}), "config": dict(config or {}), "history": list(history or []),
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "torch_version": str(torch.__version__),
    }
    extra = {"split": split, "model_def": model_def}  # None: unknown, left out
    return {**ckpt, **{k: dict(v) for k, v in extra.items() if v is not None}}


# ---------------------------------------------------------------- fields

def _int(v, least: int = 0) -> bool:
    return type(v) is int and v >= least  # not a bool


def _keyed(v) -> bool:
    return isinstance(v, dict) and all(isinstance(k, str) for k in v)


def _weights(v) -> bool:
    return isinstance(v, dict) and bool(v) and all(isinstance(k, str) and isinstance(t, torch.Tensor)
                                                    for k, t in v.items())


def _texts(*keys, optional=()):
    """A test: a dict whose `keys` hold text, and whose `optional` keys text or None."""
    return lambda v: (isinstance(v, dict) and all(isinstance(v.get(k), str) for k in keys)
                      and all(isinstance(v.get(k), (str, type(None))) for k in optional))


def _tracker(v) -> bool:  # best: None before the first epoch, +-inf or NaN after a diverged one
    return (isinstance(v, dict) and "best" in v and (v["best"] is None or type(v["best"]) in (int, float))
            and _int(v.get("best_epoch")) and _int(v.get("bad_epochs")))


def _split(v) -> bool:
    return (isinstance(v, dict) and _int(v.get("seed")) and v["seed"] < 2**64 and _int(v.get("val_size"), 1)
            and _texts(optional=("fingerprint", "validation"))(v) and v.get("fingerprint") != ""
            and v.get("validation", "train") in VALIDATION_SOURCES)


KEYED, WEIGHTS = "a dict with text keys", "a state_dict (names to tensors)"
TRACKER = "{best: a number or None, best_epoch, bad_epochs: whole numbers >= 0}"
# key -> (test, what it must be). FIELDS: what the tools read from a file of ours, checked at every load
# where the file holds it (an older file keeps the default); RESUME_FIELDS: what --resume reads besides. On
# --resume every field of both must be there, except where its test accepts None.
FIELDS = {
    "arch": (lambda v: isinstance(v, str) and v in (*ARCHS, USER_ARCH), f"one of {', '.join(ARCHS)}, {USER_ARCH} "
             "(absent: read from the weights)"),
    "arch_kwargs": (_keyed, KEYED),
    "normalize": (lambda v: isinstance(v, dict) and normalize_ok(v.get("mean", MEAN), v.get("std", STD)),
                  f"{{mean, std}}: {NORMALIZE_RULE}"),
    "classes": (lambda v: isinstance(v, (list, tuple)) and all(isinstance(c, str) and c for c in v)
                and len(set(v)) == len(v) == NUM_CLASSES, f"{NUM_CLASSES} different class names"),
    "metrics": (_keyed, KEYED),
    "config": (_keyed, KEYED),
    "history": (lambda v: isinstance(v, list) and all(_keyed(row) and _int(row.get("epoch")) for row in v),
                "a list of per-epoch dicts, each with its epoch"),
    "split": (lambda v: v is None or _split(v), "None or {seed, val_size >= 1, fingerprint: text or None, "
              f"validation: {' or '.join(VALIDATION_SOURCES)}}}"),
    "kind": (lambda v: isinstance(v, str), "text"),
    "model_def": (lambda v: v is None or _texts("given", "class", optional=("resolved", "sha256"))(v),
                  "None or {given, class: text; resolved, sha256: text or None}"),
    "teachers": (lambda v: v is None or isinstance(v, list) and all(map(_texts("path", "sha256"), v)),
                 "a list of {path, sha256}"),
}
RESUME_FIELDS = {
    "model": (_weights, WEIGHTS),
    "optimizer": (lambda v: isinstance(v, dict) and isinstance(v.get("state"), dict)
                  and isinstance(v.get("param_groups"), list) and bool(v["param_groups"])
                  and all(isinstance(g, dict) for g in v["param_groups"]), "{state, param_groups: dicts}"),
    "schedulers": (lambda v: isinstance(v, dict) and isinstance(v.get("per_batch"), dict)
                   and isinstance(v.get("plateau"), (dict, type(None))), "{per_batch: a dict, plateau: a dict or None}"),
    "scaler": (lambda v: isinstance(v, dict), "a dict ({} without a GradScaler)"),
    "early_stopping": (_tracker, TRACKER),
    "selection": (lambda v: v is None or _tracker(v), f"None (older files) or {TRACKER}"),
    "best_model": (_weights, WEIGHTS),
    "epoch": (_int, "a whole number >= 0"),
    "run_name": (lambda v: isinstance(v, str), "text"),
    "ema": (lambda v: v is None or _weights(v), f"None (no --ema-decay) or {WEIGHTS}"),
}


def _show(value) -> str:
    text = repr(value) if value is None or isinstance(value, (bool, int, float, str)) else f"a {type(value).__name__}"
    return text if len(text) <= 40 else text[:37] + "..."


def _check(path, meta: dict, table: dict, every: bool = False) -> None:
    """Each field of `table` that `meta` holds passes its test; with `every`, each that the test does not
    allow to be None is there."""
    for key, (ok, what) in table.items():
        if key in meta and not ok(meta[key]):
            raise UserError(f"{path}: checkpoint field {key!r} must be {what}, got {_show(meta[key])}")
        if every and key not in meta and not ok(None):
            raise UserError(f"{path}: checkpoint field {key!r} is missing")


def _check_tensors(path, state_dict: dict, where: str) -> None:
    """Weights must hold values: a meta-device tensor (from a model built on torch.device("meta") and saved
    before its weights were loaded) has a shape and no data."""
    empty = [k for k, v in state_dict.items() if v.is_meta]
    if empty:
        more = f" (and {len(empty) - 1} more)" if len(empty) > 1 else ""
        raise UserError(f"{path}: checkpoint field '{where}{empty[0]}' is a meta-device tensor{more}: a shape "
                        "without values; save the model after its weights were loaded")


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


def _refuse_other_files(path: Path) -> None:
    """torch.save writes a zip archive (before torch 1.6: a pickle, which starts with the PROTO opcode);
    torch.jit.save writes a zip like it, with compiled code and a constants.pkl beside the data. torch.load
    allocates the size that the file declares for each tensor before reading it, so a file that declares
    far more than it holds is refused unread: torch.save stores a zip's entries uncompressed."""
    if not path.is_file():  # opening a named pipe would wait for a writer
        raise UserError(f"checkpoint not found: {path}" if not path.exists() else f"checkpoint is not a file: {path}")
    try:
        with open(path, "rb") as fh:
            start = fh.read(4)
    except OSError as exc:
        raise UserError(f"cannot read checkpoint {path}: {exc.strerror}") from None
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
    _refuse_other_files(path)
    try:
        with warnings.catch_warnings():  # torch warns about pickle protocols it then refuses anyway
            warnings.simplefilter("ignore", UserWarning)
            return torch.load(path, map_location="cpu", weights_only=True), False
    except Exception as exc:  # garbage makes the unpickler fail with any type (KeyError, IndexError, ...)
        if not (isinstance(exc, pickle.UnpicklingError) and "Weights only load failed" in str(exc)):
            raise UserError(f"{path} is not a readable PyTorch checkpoint (truncated or corrupt?): "
                            f"{first_line(exc, sentence=True)}") from None
        if not trust_pickle:
            raise UserError(f"{path} holds pickled Python objects, not just weights; loading it would run code from "
                            f"the file, so it was refused ({refusal_hint})") from None
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


def _extract(obj, path: Path) -> _Extracted:
    """The weights and our metadata from whatever torch.load returned."""
    if isinstance(obj, nn.Module):
        return _Extracted(obj.state_dict(), "pickled nn.Module (trusted)", {})
    if isinstance(obj, dict) and obj.get("format") == FORMAT:
        version = obj.get("format_version")
        if not isinstance(version, int) or version > FORMAT_VERSION:
            raise UserError(f"{path}: checkpoint format version {version} is newer than this tool reads "
                            f"({FORMAT_VERSION}); upgrade fashion_ft")
        _check(path, obj, {"model": RESUME_FIELDS["model"]}, every=True)
        return _Extracted(obj["model"], f"{FORMAT} v{version}", obj, "model.")
    if _weights(obj):
        return _Extracted(obj, "bare state_dict", {})
    if not isinstance(obj, dict):
        raise UserError(f"{path} holds a {type(obj).__name__}, not model weights")
    for key in WRAPPER_KEYS:
        inner = obj.get(key)
        if isinstance(inner, nn.Module):
            return _Extracted(inner.state_dict(), f"dict with a pickled nn.Module under {key!r} (trusted)", {})
        if _weights(inner):
            return _Extracted(inner, f"dict with state_dict under {key!r}", {}, f"{key}.")
    raise UserError(f"{path}: no model weights found (its top-level keys: {', '.join(map(str, list(obj)[:6]))})")


def _resolve_arch(found: _Extracted, state_dict: dict, max_params: int) -> tuple[str, dict]:
    """(arch, kwargs) named by our file and checked against its weights, or inferred from the weights. The
    model must predict exactly the 10 Fashion-MNIST classes; the error names the field that set the count,
    else the head's weight in the file."""
    arch = found.meta.get("arch")
    if arch is None:
        arch, arch_kwargs = infer_arch(state_dict)
    else:
        arch_kwargs = resolve_arch_kwargs(arch, found.meta.get("arch_kwargs") or {})
    model = on_meta(lambda: build_model(arch, arch_kwargs), max_params)
    problems = shape_mismatches(model, state_dict)
    if problems:
        raise UserError(f"weights do not match arch {arch}: {'; '.join(problems)}")
    outputs, head = output_classes(model)
    if outputs != NUM_CLASSES:
        named = "arch_kwargs.num_classes" if "num_classes" in found.meta.get("arch_kwargs", {}) else found.where + head
        raise UserError(f"checkpoint field {named!r} gives the model {outputs} output classes, Fashion-MNIST has "
                        f"{NUM_CLASSES}")
    return arch, arch_kwargs


def _fit_keys(model: nn.Module, state_dict: dict) -> dict:
    """The weights under the key names of the user's class: as saved when they match it, else without
    the DataParallel/compile prefixes (a leading `module.` may be a real attribute of the class)."""
    expected = set(model.state_dict())
    if set(state_dict) == expected:
        return state_dict
    stripped = strip_prefixes(state_dict)
    return stripped if len(expected & set(stripped)) > len(expected & set(state_dict)) else state_dict


def _user_source(found: _Extracted, definition, kwargs, max_params: int):
    """(kwargs, weights under its keys) of a user's class, checked against the weights: the shapes on the meta
    device first, so that a recorded width cannot take the memory."""
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
    """Read, recognise and check a checkpoint; each failure is one UserError line naming the file (and the
    field). `refusal_hint` ends the refusal of a pickle. `model_def` and `model_kwargs` (--model-def,
    --model-kwargs) build a file that records the user's class or no architecture. The model is built on the
    meta device and matched against the weights before anything is allocated, with at most `max_params`
    parameters. `ours_only`: one of our architectures, written by this tool (a teacher)."""
    path = Path(path)
    obj, unpickled = _torch_load(path, trust_pickle, refusal_hint)
    found = _extract(obj, path)
    meta, recorded = found.meta, found.meta.get("model_def")
    _check_tensors(path, found.state_dict, found.where)
    _check(path, meta, FIELDS)
    if ours_only and (recorded is not None or meta.get("arch") not in ARCHS):
        raise UserError(f"{path}: only a checkpoint this tool wrote of one of its architectures ({', '.join(ARCHS)}) "
                        "can teach: it records its normalisation, and a class of your own runs only as the model "
                        "trained (--model-def)")
    if recorded is not None and model_def is None:
        raise userdef.refusal(recorded, str(path))
    definition = model_def if recorded is not None or (model_def is not None and not meta.get("arch")) else None
    try:  # the model's own checks cannot know the file: it is named here
        if definition is not None:
            arch, (arch_kwargs, state_dict) = USER_ARCH, _user_source(found, definition, model_kwargs, max_params)
        else:
            state_dict = strip_prefixes(found.state_dict)
            arch, arch_kwargs = _resolve_arch(found, state_dict, max_params)
    except UserError as exc:
        raise UserError(f"{path}: {exc}") from None
    norm = meta.get("normalize", {})
    return LoadedCheckpoint(
        path=path, source_format=found.source_format, arch=arch, arch_kwargs=arch_kwargs, state_dict=state_dict,
        mean=float(norm.get("mean", MEAN)), std=float(norm.get("std", STD)), meta=meta, unpickled=unpickled,
        model_def=definition, container=FORMAT if meta else (found.where[:-1] or None),
    )


# ---------------------------------------------------------------- resuming

def validate_resumable(path, meta: dict) -> None:
    """Check that `meta` (LoadedCheckpoint.meta of `path`) holds everything resuming a run reads; a
    missing or wrong field is one UserError line naming the file and the field."""
    if meta.get("kind") != "last":
        raise UserError(f"{path} is not a resumable checkpoint (its 'kind' is {_show(meta.get('kind'))}, not "
                        "'last'); resume from the last.pt a run wrote")
    try:
        _check(path, meta, FIELDS | RESUME_FIELDS, every=True)
        for name in ("best_model", "ema"):
            _check_tensors(path, meta.get(name) or {}, f"{name}.")
        model, best = meta["model"], meta["best_model"]
        odd = min(model.keys() ^ best.keys(), default=None) or next(
            (k for k in model if model[k].shape != best[k].shape), None)
        if odd is not None:
            raise UserError(f"{path}: checkpoint field 'best_model.{odd}' does not match the same tensor of "
                            "'model' (missing, extra or another shape)")
    except UserError as exc:
        raise UserError(f"{exc}; start a new run from its weights with --model-path instead") from None


def nonfinite_tensors(state_dict: dict) -> list[str]:
    return [k for k, v in state_dict.items() if v.is_floating_point() and not torch.isfinite(v).all()]

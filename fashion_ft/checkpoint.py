"""Checkpoints: atomic save, safe load, and the formats users already have.

A save is a temporary file, fsynced and `os.replace`d, so a crash, Ctrl-C or kill -9 leaves the old or the
new complete file. A load is `torch.load(weights_only=True)`; unpickling (which runs code) happens only with
--trust-pickle. The fields that the tools read are checked at load, those --resume reads besides by
validate_resumable: a bad one is one line naming the file and the field.
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

from . import model
from .config import MAX_PARAMETERS, NORMALIZE_RULE, normalize_ok
from .data import CLASSES, MEAN, STD, VALIDATION_SOURCES, Split
from .errors import UserError, deferred, first_line
from .model import (
    ARCHS,
    NUM_CLASSES,
    USER_ARCH,
    build_source,
    check_outputs,
    infer_arch,
    on_meta,
    output_classes,
    resolve_arch_kwargs,
    shape_mismatches,
    unwrap,
)

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
    ({seed, val_size, fingerprint, validation}); `model_def`: the user's class (model.ModelDef.to_dict())."""
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
                   and isinstance(v.get("plateau"), (dict, type(None))),
                   "{per_batch: a dict, plateau: a dict or None}"),
    "scaler": (lambda v: isinstance(v, dict), "a dict ({} without a GradScaler)"),
    "early_stopping": (_tracker, TRACKER),
    "selection": (lambda v: v is None or _tracker(v), f"None (older files) or {TRACKER}"),
    "best_model": (_weights, WEIGHTS),
    "epoch": (_int, "a whole number >= 0"),
    "run_name": (lambda v: isinstance(v, str), "text"),
    "ema": (lambda v: v is None or _weights(v), f"None (no --ema-decay) or {WEIGHTS}"),
    "input_container": (lambda v: v is None or isinstance(v, str), "None (a bare state_dict) or text"),
}


def _show(value) -> str:
    text = repr(value) if value is None or isinstance(value, (bool, int, float, str)) else f"a {type(value).__name__}"
    return text if len(text) <= 40 else text[:37] + "..."


def _check(path, meta: dict, table: dict, every: bool = False) -> None:
    """Each field of `table` in `meta` passes its test; with `every`, one whose test refuses None is there."""
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
    """A model's weights and what they were trained with: a file read by load_checkpoint, or random weights."""

    path: Path | None  # None: random weights (--from-scratch)
    source_format: str  # how the weights were stored, for the user
    arch: str
    arch_kwargs: dict
    state_dict: dict
    mean: float = MEAN
    std: float = STD
    meta: dict = field(default_factory=dict)  # the whole file when it is one of ours
    unpickled: bool = False  # read with weights_only=False (--trust-pickle): code in the file may have run
    model_def: model.ModelDef | None = None  # the user's class, built with arch_kwargs
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
    def split(self) -> Split | None:
        """The split the weights were trained with; None: unknown (a model from elsewhere). Files written
        before the split had its own record drew it from their --seed and --val-size, which their config keeps."""
        if split := self.meta.get("split"):
            return Split(split["seed"], split["val_size"], split.get("fingerprint"), split.get("validation", "train"))
        config = self.meta.get("config") or {}
        if type(config.get("seed")) is int and type(config.get("val_size")) is int:
            return Split(config["seed"], config["val_size"])
        return None

    def describe(self) -> str:
        name = f"{self.model_def.given}:{self.model_def.cls}" if self.model_def else f"arch {self.arch}"
        return f"{self.path} ({self.source_format}, {name})" if self.path else f"{self.source_format} ({name})"


def _torch_load(path: Path, trust_pickle: bool, refusal_hint: str) -> tuple[object, bool]:
    """(what the file holds, whether it was unpickled as trusted). torch.save writes a zip archive (before
    torch 1.6: a pickle, which starts with the PROTO opcode); torch.jit.save writes a zip like it, with
    compiled code and a constants.pkl beside the data. torch.load allocates the size that the file declares
    for each tensor before reading it, so a file that declares far more than it holds is refused unread."""
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


def strip_prefixes(state_dict: dict) -> dict:
    return {PREFIXES.sub("", key): value for key, value in state_dict.items()}


def _extract(obj, path: Path) -> tuple[dict, str, dict, str]:
    """(weights, how they were stored, our metadata or {}, their key path in the file)."""
    if isinstance(obj, nn.Module):
        return obj.state_dict(), "pickled nn.Module (trusted)", {}, ""
    if isinstance(obj, dict) and obj.get("format") == FORMAT:
        version = obj.get("format_version")
        if not isinstance(version, int) or version > FORMAT_VERSION:
            raise UserError(f"{path}: checkpoint format version {version} is newer than this tool reads "
                            f"({FORMAT_VERSION}); upgrade fashion_ft")
        _check(path, obj, {"model": RESUME_FIELDS["model"]}, every=True)
        return obj["model"], f"{FORMAT} v{version}", obj, "model."
    if _weights(obj):
        return obj, "bare state_dict", {}, ""
    for key in WRAPPER_KEYS if isinstance(obj, dict) else ():
        if isinstance(obj.get(key), nn.Module):
            return obj[key].state_dict(), f"dict with a pickled nn.Module under {key!r} (trusted)", {}, ""
        if _weights(obj.get(key)):
            return obj[key], f"dict with state_dict under {key!r}", {}, f"{key}."
    if not isinstance(obj, dict):
        raise UserError(f"{path} holds a {type(obj).__name__}, not model weights")
    raise UserError(f"{path}: no model weights found (its top-level keys: {', '.join(map(str, list(obj)[:6]))})")


def _matched(meta: dict, weights: dict, where: str, definition, model_kwargs, max_params: int):
    """(arch, kwargs, weights under the model's key names): the user's class, the file's arch or the one its
    weights match, built on the meta device (a recorded width takes no memory), must fit the weights and
    predict the 10 classes; the error names the field that set the count, else the head's tensor."""
    if definition is not None:
        arch, kwargs = USER_ARCH, dict(meta.get("arch_kwargs") or {}) if model_kwargs is None else dict(model_kwargs)
    elif meta.get("arch") is None:
        arch, kwargs = infer_arch(strip_prefixes(weights))
    else:
        arch, kwargs = meta["arch"], resolve_arch_kwargs(meta["arch"], meta.get("arch_kwargs"))
    name = f"{definition.given}:{definition.cls}" if definition else f"arch {arch}"
    shapes = on_meta(lambda: build_source(arch, kwargs, definition), max_params)
    if set(weights) != set(shapes.state_dict()):  # as saved if they fit: `module.` may be a real attribute
        weights = strip_prefixes(weights)
    problems = shape_mismatches(shapes, weights)
    if problems:
        raise UserError(f"the weights do not fit {name}: {'; '.join(problems[:3])}")
    if definition is not None:  # its forward may end in anything but a Linear layer: it runs once for real
        check_outputs(model.build(definition, kwargs), name)
        return arch, kwargs, weights
    outputs, head = output_classes(shapes)
    if outputs != NUM_CLASSES:
        field = "arch_kwargs.num_classes" if "num_classes" in meta.get("arch_kwargs", {}) else where + head
        raise UserError(f"checkpoint field {field!r} gives the model {outputs} output classes, Fashion-MNIST has "
                        f"{NUM_CLASSES}")
    return arch, kwargs, weights


def load_checkpoint(path, trust_pickle: bool = False, refusal_hint: str = TRUST_HINT,
                    model_def: "model.ModelDef | None" = None, model_kwargs: dict | None = None,
                    max_params: int = MAX_PARAMETERS, ours_only: bool = False) -> LoadedCheckpoint:
    """Read, recognise and check a checkpoint; each failure is one UserError line naming the file. `refusal_hint`
    ends the refusal of a pickle; `model_def` and `model_kwargs` (--model-def) build a file that records the
    user's class or no architecture; `ours_only`: one of our architectures, written by this tool (a teacher)."""
    path = Path(path)
    obj, unpickled = _torch_load(path, trust_pickle, refusal_hint)
    weights, source_format, meta, where = _extract(obj, path)
    _check_tensors(path, weights, where)
    _check(path, meta, FIELDS)
    recorded = meta.get("model_def")
    if ours_only and (recorded is not None or meta.get("arch") not in ARCHS):
        raise UserError(f"{path}: only a checkpoint this tool wrote of one of its architectures ({', '.join(ARCHS)}) "
                        "can teach: it records its normalisation, and a class of your own runs only as the model "
                        "trained (--model-def)")
    if recorded is not None and model_def is None:
        raise model.refusal(recorded, str(path))
    definition = model_def if recorded is not None or (model_def is not None and not meta.get("arch")) else None
    try:  # the model's checks cannot know the file: it is named here
        arch, arch_kwargs, weights = _matched(meta, weights, where, definition, model_kwargs, max_params)
    except UserError as exc:
        raise UserError(f"{path}: {exc}") from None
    norm = meta.get("normalize", {})
    return LoadedCheckpoint(
        path=path, source_format=source_format, arch=arch, arch_kwargs=arch_kwargs, state_dict=weights,
        mean=float(norm.get("mean", MEAN)), std=float(norm.get("std", STD)), meta=meta, unpickled=unpickled,
        model_def=definition, container=FORMAT if meta else (where[:-1] or None),
    )


# ---------------------------------------------------------------- resuming

def validate_resumable(path, meta: dict) -> None:
    """Whether `meta` (LoadedCheckpoint.meta of `path`) holds what resuming reads: else one UserError line."""
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


def require_finite(ckpt: "LoadedCheckpoint") -> "LoadedCheckpoint":
    """Training from NaN/Inf weights only spreads them: refused before anything is written."""
    bad = nonfinite_tensors(ckpt.state_dict)
    if bad:
        raise UserError(f"{ckpt.path} has NaN/Inf weights in {', '.join(bad[:3])}")
    return ckpt

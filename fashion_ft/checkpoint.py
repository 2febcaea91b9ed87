"""Checkpoints: atomic save, safe load, and the formats users already have.

Saving writes a temporary file in the target folder and `os.replace`s it (as timm's CheckpointSaver
does), so a crash, Ctrl-C or kill -9 leaves either the old or the new complete file. Loading uses
`torch.load(weights_only=True)`; unpickling arbitrary objects (a whole pickled nn.Module) runs code
and happens only when the caller passes trust_pickle=True on the user's explicit request.
"""

import datetime
import json
import os
import pickle
import tempfile
import warnings
from contextlib import suppress
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from .data import CLASSES, MEAN, STD
from .errors import UserError
from .model import build_model, infer_arch, resolve_arch_kwargs, shape_mismatches

FORMAT = "fashion_ft.checkpoint"
FORMAT_VERSION = 1
WRAPPER_KEYS = ("model_state_dict", "state_dict", "model")
PREFIXES = ("module.", "_orig_mod.")  # DataParallel/DDP, torch.compile
TRUST_HINT = "pass --trust-pickle only if you trust where this file came from"


# ---------------------------------------------------------------- saving

def atomic_write(path, write) -> None:
    """Call write(binary file) on a temporary file beside `path`, fsync, then rename it into place."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    except OSError as exc:
        raise UserError(f"cannot write {path}: {exc.strerror or exc}") from None
    try:
        with os.fdopen(fd, "wb") as fh:
            write(fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except OSError as exc:
        with suppress(OSError):
            os.unlink(tmp)
        raise UserError(f"cannot write {path}: {exc.strerror or exc}") from None
    except BaseException:
        with suppress(OSError):
            os.unlink(tmp)
        raise


def save_checkpoint(obj: dict, path) -> None:
    atomic_write(path, lambda fh: torch.save(obj, fh))


def save_json(obj, path) -> None:
    atomic_write(path, lambda fh: fh.write((json.dumps(obj, indent=2) + "\n").encode()))


def unwrap(model: nn.Module) -> nn.Module:
    """The plain model inside DDP / torch.compile wrappers, so that checkpoints load anywhere."""
    while True:
        if hasattr(model, "module"):
            model = model.module
        elif hasattr(model, "_orig_mod"):
            model = model._orig_mod
        else:
            return model


def make_checkpoint(model, arch, arch_kwargs, *, mean=MEAN, std=STD, metrics=None, config=None,
                    history=None, classes=CLASSES) -> dict:
    """The checkpoint dict of DESIGN.md, loadable with torch.load(weights_only=True)."""
    return {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "arch": arch,
        "arch_kwargs": dict(arch_kwargs),
        "model": {k: v.detach().cpu() for k, v in unwrap(model).state_dict().items()},
        "classes": list(classes),
        "normalize": {"mean": float(mean), "std": float(std)},
        "metrics": dict(metrics or {}),
        "config": dict(config or {}),
        "history": list(history or []),
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "torch_version": str(torch.__version__),
    }


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

    def build(self) -> nn.Module:
        model = build_model(self.arch, self.arch_kwargs)
        model.load_state_dict(self.state_dict)
        return model


def _check_readable(path: Path) -> None:
    if not path.exists():
        raise UserError(f"checkpoint not found: {path}")
    if not path.is_file():
        raise UserError(f"checkpoint is not a file: {path}")
    if not os.access(path, os.R_OK):
        raise UserError(f"checkpoint is not readable (permissions): {path}")
    if path.stat().st_size == 0:
        raise UserError(f"checkpoint is empty (0 bytes): {path}")


def _looks_like_torch_file(path: Path) -> bool:
    """torch.save writes a zip archive (before torch 1.6: a pickle, which starts with the PROTO opcode)."""
    with open(path, "rb") as fh:
        start = fh.read(4)
    return start[:1] == b"\x80" or start == b"PK\x03\x04"  # a truncated zip still starts like one


def _first_sentence(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    return text.split(". ")[0].rstrip(".")


def _torch_load(path: Path, trust_pickle: bool):
    try:
        if not _looks_like_torch_file(path):
            raise UserError(f"{path} is not a PyTorch checkpoint (neither a zip archive nor a pickle)")
        with warnings.catch_warnings():  # torch warns about pickle protocols it then refuses anyway
            warnings.simplefilter("ignore", UserWarning)
            return torch.load(path, map_location="cpu", weights_only=True)
    except UserError:
        raise
    except pickle.UnpicklingError as exc:
        if "Weights only load failed" not in str(exc):
            raise UserError(f"{path} is not a readable PyTorch checkpoint (truncated or corrupt?)") from None
        if not trust_pickle:
            raise UserError(
                f"{path} holds pickled Python objects, not just weights; loading it would run code from "
                f"the file, so it was refused ({TRUST_HINT})"
            ) from None
    except Exception as exc:  # garbage makes the unpickler fail with any type (KeyError, IndexError, ...)
        raise UserError(
            f"{path} is not a readable PyTorch checkpoint (truncated or corrupt?): {_first_sentence(exc)}"
        ) from None
    try:
        return torch.load(path, map_location="cpu", weights_only=False)  # user passed --trust-pickle
    except Exception as exc:
        raise UserError(f"{path} could not be unpickled even as trusted: {_first_sentence(exc)}") from None


def _is_state_dict(obj) -> bool:
    return isinstance(obj, dict) and bool(obj) and all(isinstance(v, torch.Tensor) for v in obj.values())


def strip_prefixes(state_dict: dict) -> dict:
    out = {}
    for key, value in state_dict.items():
        changed = True
        while changed:
            changed = False
            for prefix in PREFIXES:
                if key.startswith(prefix):
                    key, changed = key[len(prefix):], True
        out[key] = value
    return out


def _extract(obj) -> tuple[dict, str, dict]:
    """(state_dict, how it was stored, our metadata or {}) from whatever torch.load returned."""
    if isinstance(obj, nn.Module):
        return obj.state_dict(), "pickled nn.Module (trusted)", {}
    if isinstance(obj, dict) and obj.get("format") == FORMAT:
        version = obj.get("format_version")
        if not isinstance(version, int) or version > FORMAT_VERSION:
            raise UserError(
                f"checkpoint format version {version} is newer than this tool reads ({FORMAT_VERSION}); "
                "upgrade fashion_ft"
            )
        if not _is_state_dict(obj.get("model")):
            raise UserError(f"checkpoint in {FORMAT} format holds no model weights under 'model'")
        return obj["model"], f"{FORMAT} v{version}", obj
    if _is_state_dict(obj):
        return obj, "bare state_dict", {}
    if isinstance(obj, dict):
        for key in WRAPPER_KEYS:
            inner = obj.get(key)
            if isinstance(inner, nn.Module):
                return inner.state_dict(), f"dict with a pickled nn.Module under {key!r} (trusted)", {}
            if _is_state_dict(inner):
                return inner, f"dict with state_dict under {key!r}", {}
        keys = ", ".join(map(str, list(obj)[:6]))
        raise UserError(f"no model weights found in the checkpoint (its top-level keys: {keys})")
    raise UserError(f"checkpoint holds a {type(obj).__name__}, not model weights")


def _arch_from_meta(path: Path, meta: dict) -> tuple[str, dict]:
    arch, arch_kwargs = meta["arch"], meta.get("arch_kwargs") or {}
    if not isinstance(arch, str) or not isinstance(arch_kwargs, dict):
        raise UserError(f"{path}: 'arch' must be a name and 'arch_kwargs' a dict, got {arch!r} and {arch_kwargs!r}")
    try:
        return arch, resolve_arch_kwargs(arch, arch_kwargs)
    except UserError as exc:
        raise UserError(f"{path}: {exc}") from None


def load_checkpoint(path, trust_pickle: bool = False) -> LoadedCheckpoint:
    """Read, recognise and verify a checkpoint; every failure is a UserError with one clear line."""
    path = Path(path)
    _check_readable(path)
    try:
        state_dict, source_format, meta = _extract(_torch_load(path, trust_pickle))
    except UserError as exc:
        message = str(exc)
        raise UserError(message if message.startswith(str(path)) else f"{path}: {message}") from None
    state_dict = strip_prefixes(state_dict)
    if meta.get("arch") is not None:  # ours: the file names its arch, so check against that
        arch, arch_kwargs = _arch_from_meta(path, meta)
        problems = shape_mismatches(build_model(arch, arch_kwargs), state_dict)
        if problems:
            raise UserError(f"{path}: weights do not match arch {arch}: {'; '.join(problems)}")
    else:
        try:
            arch, arch_kwargs = infer_arch(state_dict)
        except UserError as exc:
            raise UserError(f"{path}: {exc}") from None
    norm = meta.get("normalize") if isinstance(meta.get("normalize"), dict) else {}
    return LoadedCheckpoint(
        path=path, source_format=source_format, arch=arch, arch_kwargs=arch_kwargs,
        state_dict=state_dict, mean=float(norm.get("mean", MEAN)), std=float(norm.get("std", STD)),
        classes=list(meta.get("classes", CLASSES)), meta=meta,
    )


def nonfinite_tensors(state_dict: dict) -> list[str]:
    """Names of floating-point tensors holding NaN or Inf."""
    return [
        k for k, v in state_dict.items()
        if v.is_floating_point() and not torch.isfinite(v).all()
    ]

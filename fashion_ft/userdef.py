"""A user's own network class: `--model-def FILE.py:CLASS` (or `pkg.mod:CLASS`) with `--model-kwargs`.

The file is the user's own code, as trusted as any script they run (the weights beside it still load with
weights_only=True). Our checkpoints record the definition (path as given and resolved, class, the file's
sha256) for the user to read, never to act on: a checkpoint never chooses code to run. The class is
imported only when the user names its file with `--model-def`, on every load (as `trust_remote_code=True`
is asked for on every load); the refusal prints the exact flag to pass.
"""

import hashlib
import importlib
import importlib.util
import io
import os
import shlex
import sys
from contextlib import contextmanager, redirect_stderr
from dataclasses import dataclass
from pathlib import Path

from torch import nn

from .cli import printable
from .errors import UsageError, UserError, first_line


@dataclass(frozen=True)
class ModelDef:
    given: str  # FILE.py or pkg.mod, as the user wrote it
    cls: str
    resolved: str | None = None  # the file's absolute path; None: a dotted module
    sha256: str | None = None  # of the file's bytes when it was recorded

    def to_dict(self) -> dict:
        return {"given": self.given, "resolved": self.resolved, "class": self.cls, "sha256": self.sha256}

    @classmethod
    def from_dict(cls, record: dict) -> "ModelDef":
        return cls(str(record["given"]), str(record["class"]), record.get("resolved"), record.get("sha256"))


def parse(text: str) -> ModelDef:
    """'path/to/mnist-gpu.py:Net' or 'pkg.mod:Net' -> ModelDef; a UsageError names what is wrong."""
    target, sep, cls = text.rpartition(":")
    if not sep or not target or not cls.isidentifier():
        raise UsageError(f"--model-def {text!r}: expected FILE.py:CLASS or package.module:CLASS, e.g. "
                         "--model-def mnist-gpu.py:Net")
    if not (target.endswith(".py") or "/" in target):
        return ModelDef(target, cls)
    path = Path(target).expanduser()
    if not path.is_file():
        raise UsageError(f"--model-def {text}: {target} " + ("is not a file" if path.exists() else "not found"))
    return ModelDef(target, cls, str(path.resolve()), file_sha256(path))


def file_sha256(path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def refusal(record: dict, where: str) -> UserError:
    """Why checkpoint `where`, which records a user's class, is not built without --model-def."""
    definition = ModelDef.from_dict(record)
    flag = printable(shlex.quote(f"{definition.resolved or definition.given}:{definition.cls}"))
    return UserError(f"{where}: its model is your class {printable(definition.cls)}, and a checkpoint never chooses "
                     f"code to run; if you trust the file, pass --model-def {flag}")


@contextmanager
def _stdin_from_devnull():
    """A module that reads stdin at import (input(), a prompt) gets end-of-file instead of waiting forever
    on a terminal or an open pipe: descriptor 0 itself points at /dev/null meanwhile."""
    try:
        saved = os.dup(0)
    except OSError:  # no stdin at all: reading it fails at once
        yield
        return
    devnull = os.open(os.devnull, os.O_RDONLY)
    os.dup2(devnull, 0)
    os.close(devnull)
    try:
        yield
    finally:
        os.dup2(saved, 0)
        os.close(saved)


@contextmanager
def _user_import(path: Path):
    """Import as the user's script would be, less what must not happen: no __main__ block (the module
    has another name), no bytecode written into their folder, no reading of our argv by a top-level
    parse_args nor of our stdin, their folder on sys.path for its sibling modules only while importing.
    What it writes to stderr is held back, and passed on unless the import exits (argparse's usage text)."""
    saved = sys.argv, sys.dont_write_bytecode, list(sys.path)
    sys.argv, sys.dont_write_bytecode = [str(path)], True
    sys.path.insert(0, str(path.parent))
    held = io.StringIO()
    try:
        with redirect_stderr(held), _stdin_from_devnull():
            yield
    except SystemExit as exc:
        said = (held.getvalue().strip().splitlines() or [f"code {exc.code}"])[-1]
        raise UserError(f"{path}: importing it exited ({said}): a top-level parse_args() or sys.exit()? move it "
                        "under if __name__ == \"__main__\":") from None
    else:
        sys.stderr.write(held.getvalue())
    finally:
        sys.argv, sys.dont_write_bytecode, sys.path[:] = saved


def _import(definition: ModelDef):
    where, name = definition.given, None
    try:
        if definition.resolved is None:
            with _user_import(Path.cwd() / "_"):
                return importlib.import_module(where)
        name = f"fashion_ft_user_{(definition.sha256 or '')[:16]}_{Path(where).stem.replace('-', '_')}"
        if name not in sys.modules:  # one import per process: every model built from it shares its classes
            spec = importlib.util.spec_from_file_location(name, definition.resolved)
            # in sys.modules before it runs: dataclasses and pickling look their module up meanwhile
            module = sys.modules[name] = importlib.util.module_from_spec(spec)
            with _user_import(Path(definition.resolved)):
                spec.loader.exec_module(module)
        return sys.modules[name]
    except Exception as exc:  # the user's code may fail in any way; a half-run module is not kept
        sys.modules.pop(name, None)
        if isinstance(exc, UserError):
            raise
        if isinstance(exc, SyntaxError):
            raise UserError(f"{exc.filename or where}:{exc.lineno}: syntax error: {exc.msg}") from None
        if isinstance(exc, ModuleNotFoundError) and exc.name:
            raise UserError(missing_module(where, exc.name)) from None
        raise UserError(f"{where}: importing it failed: {type(exc).__name__}: {first_line(exc)}") from None


def missing_module(where: str, module: str) -> str:
    top = module.partition(".")[0]
    return (f"{where} imports {module}, which this Python ({sys.executable}) does not have: install it with "
            f"{shlex.quote(sys.executable)} -m pip install {top} (its package may have another name), or put "
            "the class in a file of its own that imports only what the class needs")


def build(definition: ModelDef, kwargs: dict) -> nn.Module:
    """An instance of the user's class with `kwargs`; every failure is one UserError line."""
    module = _import(definition)
    cls = getattr(module, definition.cls, None)
    if cls is None:
        raise UserError(f"{definition.given} has no class {definition.cls}")
    if not (isinstance(cls, type) and issubclass(cls, nn.Module)):
        raise UserError(f"{definition.given}:{definition.cls} is not an nn.Module subclass (it is a "
                        f"{type(cls).__name__})")
    try:
        return cls(**kwargs)
    except Exception as exc:
        raise UserError(f"{definition.given}:{definition.cls}({', '.join(f'{k}={v!r}' for k, v in kwargs.items())}) "
                        f"failed: {type(exc).__name__}: {first_line(exc)}") from None

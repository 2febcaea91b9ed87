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
from contextlib import redirect_stderr
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
    """Why checkpoint `where`, which records a user's class (ModelDef.to_dict()), is not built without
    --model-def."""
    flag = printable(shlex.quote(f"{record.get('resolved') or record['given']}:{record['class']}"))
    return UserError(f"{where}: its model is your class {printable(str(record['class']))}, and a checkpoint never "
                     f"chooses code to run; if you trust the file, pass --model-def {flag}")


def _import(definition: ModelDef):
    """The user's module, imported as their script would be, less what must not happen: no __main__ block
    (the module has another name), no bytecode written into their folder, no reading of our argv (a
    top-level parse_args) nor of our stdin (input() gets end-of-file), their folder on sys.path for its
    sibling modules only meanwhile. What it writes to stderr is passed on once it is imported: a failure
    (argparse's usage text) stays one line. One import per process, under a name of its own: every model
    built from it shares its classes."""
    where, name = definition.given, None
    path = Path(definition.resolved or Path.cwd() / "_")
    saved, held = (sys.argv, sys.dont_write_bytecode, list(sys.path), sys.stdin), io.StringIO()
    try:
        with open(os.devnull) as devnull, redirect_stderr(held):
            sys.argv, sys.dont_write_bytecode, sys.stdin = [str(path)], True, devnull
            sys.path.insert(0, str(path.parent))
            if definition.resolved is None:
                module = importlib.import_module(where)
            else:
                name = f"fashion_ft_user_{(definition.sha256 or '')[:16]}_{path.stem.replace('-', '_')}"
                if name not in sys.modules:
                    spec = importlib.util.spec_from_file_location(name, path)
                    # in sys.modules before it runs: dataclasses and pickling look their module up meanwhile
                    sys.modules[name] = importlib.util.module_from_spec(spec)
                    spec.loader.exec_module(sys.modules[name])
                module = sys.modules[name]
    except (Exception, SystemExit) as exc:  # the user's code may fail in any way; a half-run module is not kept
        sys.modules.pop(name, None)
        if isinstance(exc, SystemExit):
            said = (held.getvalue().strip().splitlines() or [f"code {exc.code}"])[-1]
            raise UserError(f"{where}: importing it exited ({said}): a top-level parse_args() or sys.exit()? move "
                            "it under if __name__ == \"__main__\":") from None
        if isinstance(exc, SyntaxError):
            raise UserError(f"{exc.filename or where}:{exc.lineno}: syntax error: {exc.msg}") from None
        if isinstance(exc, ModuleNotFoundError) and exc.name:
            python = sys.executable
            raise UserError(f"{where} imports {exc.name}, which this Python ({python}) does not have: install it "
                            f"with {shlex.quote(python)} -m pip install {exc.name.partition('.')[0]} (its package may "
                            "have another name), or put the class in a file of its own that imports only what the "
                            "class needs") from None
        raise UserError(f"{where}: importing it failed: {type(exc).__name__}: {first_line(exc)}") from None
    finally:
        sys.argv, sys.dont_write_bytecode, sys.path[:], sys.stdin = saved
    sys.stderr.write(held.getvalue())
    return module


def build(definition: ModelDef, kwargs: dict) -> nn.Module:
    """An instance of the user's class with `kwargs`; every failure is one UserError line."""
    cls = getattr(_import(definition), definition.cls, None)
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

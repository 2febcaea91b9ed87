"""A user's own network class: `--model-def FILE.py:CLASS` (or `pkg.mod:CLASS`) with `--model-kwargs`.

The file is the user's own code, as trusted as any script they run (the weights beside it still load with
weights_only=True). Our checkpoints record the definition (path as given and resolved, class, the file's
sha256), so that the tools need no `--model-def` on the machine of the run. A record alone never makes a
checkpoint into code that runs: the file is imported only while it still has the recorded sha256, and a
dotted module never (finding it already runs package code); otherwise the message prints the exact
`--model-def` to pass.
"""

import hashlib
import importlib
import importlib.util
import io
import shlex
import sys
from contextlib import contextmanager, redirect_stderr
from dataclasses import dataclass
from pathlib import Path

from torch import nn

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


def trusted(record: dict, where: str) -> ModelDef:
    """The recorded definition of checkpoint `where`, if its file is still the one recorded."""
    definition = ModelDef.from_dict(record)
    if definition.resolved is None:
        reason = "a module is imported only when you name it"
    elif not Path(definition.resolved).is_file():
        reason = f"{definition.resolved} is gone"
    elif file_sha256(definition.resolved) != definition.sha256:
        reason = f"{definition.resolved} changed since (its sha256 differs)"
    else:
        return definition
    flag = shlex.quote(f"{definition.resolved or definition.given}:{definition.cls}")
    raise UserError(f"{where}: its model class {definition.cls} was defined in {definition.given}, but "
                    f"{reason}; if you trust the file, pass --model-def {flag}")


@contextmanager
def _user_import(path: Path):
    """Import as the user's script would be, less what must not happen: no __main__ block (the module
    has another name), no bytecode written into their folder, no reading of our argv by a top-level
    parse_args, their folder on sys.path for its sibling modules only while importing. What it writes to
    stderr is held back, and passed on unless the import exits (argparse's usage text)."""
    saved = sys.argv, sys.dont_write_bytecode, list(sys.path)
    sys.argv, sys.dont_write_bytecode = [str(path)], True
    sys.path.insert(0, str(path.parent))
    held = io.StringIO()
    try:
        with redirect_stderr(held):
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
        raise UserError(f"{where}: importing it failed: {type(exc).__name__}: {first_line(exc)}") from None


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

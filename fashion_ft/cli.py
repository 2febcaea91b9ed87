"""The command-line contract every script keeps: a failure is one line on stderr and an exit code.

    sys.exit(cli.run(lambda: body(argv), debug="--debug" in argv))

Exit codes: what body returns; UserError: its own (1, or 2 for usage); Interrupted: 130 (SIGINT), 129 (SIGHUP) or
143 (SIGTERM); Ctrl-C: 130; anything unexpected: 1, with the traceback only under --debug. A broken pipe
(`script | head -1`: the reader went away) ends the script quietly with 1. With a SignalGuard, any end after
it recorded a signal is that interrupt: a signal may surface as another error (torch.save turns it
into a RuntimeError) or be swallowed by a library, and the user asked to stop either way.
"""

import argparse
import json
import os
import re
import sys
import typing
import warnings
from collections.abc import Callable
from contextlib import suppress

from .errors import Interrupted, UserError, first_line
from .signals import SignalGuard

# requirements.txt: a script that cannot import one of these runs in a Python the project was not set up in
REQUIRED_PACKAGES = ("torch", "torchvision", "tensorboard", "numpy", "tqdm")
# The unicode categories Cc (C0, DEL, C1), Zl, Zp and Cs (lone surrogates, from undecodable file names):
# each can end a line or drive a terminal
_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f\u2028\u2029\ud800-\udfff]")


def printable(text: str) -> str:
    """text as one terminal line: control characters escaped as Python writes them (\\n, \\x1b, \\u2028),
    so that a path given by the user cannot split a printed line; any other text, in any script, as it is."""
    return _CONTROL.sub(lambda m: repr(m[0])[1:-1], text)


def json_object(text: str) -> dict:
    """argparse type of a JSON-object flag (--arch-kwargs, --model-kwargs), or a one-line usage error."""
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        raise argparse.ArgumentTypeError(f"not JSON ({exc.msg}): {text}") from None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError(f"must be a JSON object like '{{\"blocks\": 1}}', got {text}")
    return value


def add_flag(g, name: str, help: str, **kw) -> None:
    """Add the flag of Config field `name` to a parser or argument group: its default (which --help shows),
    type and choices are the field's (imported late: the choices' modules import torch, after the scripts
    installed their signal handlers)."""
    from .config import Config, choices, flag_of

    hint = Config.__annotations__[name]
    kinds = [t for t in typing.get_args(hint) or (hint,) if t is not type(None)]
    if bool in kinds:
        kw.setdefault("action", "store_true")
    elif "type" not in kw:
        kw["type"] = json_object if dict in kinds else kinds[0]
    if name in (options := choices()):
        kw["choices"] = [c for c in options[name] if c is not None]
    g.add_argument(flag_of(name), default=getattr(Config(), name), help=help, **kw)


def add_shared(g, *flags: str) -> None:
    """Add these of the flags both scripts take, each defined once, to a parser or argument group."""
    from .normalization import CANDIDATES

    (fm_mean, fm_std), (m_mean, m_std) = CANDIDATES["Fashion-MNIST's"], CANDIDATES["MNIST's"]
    shared = {
        "--model-def": ("your own network class (a file path, hyphens allowed, or pkg.mod:CLASS), for a checkpoint "
                        "of its weights; the file is imported without running its __main__ block",
                        dict(metavar="FILE.py:CLASS")),
        "--model-kwargs": ("keyword arguments of its constructor, e.g. '{\"width\": 32}'", dict(metavar="JSON")),
        "--normalize": (f"the input normalisation the model was trained with (pixels in [0, 1]); unset: the "
                        f"checkpoint's record, else Fashion-MNIST's {fm_mean:.4f} {fm_std:.4f} (MNIST's is {m_mean} "
                        f"{m_std})", dict(type=float, nargs=2, metavar=("MEAN", "STD"))),
        "--trust-pickle": ("allow a checkpoint holding pickled Python objects (runs code from the file!)", {}),
        "--data-dir": ("folder with the IDX files; unset: $FASHION_MNIST_DIR, ./data, then the Debian folder", {}),
        "--download": ("download Fashion-MNIST into ./data if missing", {}),
        "--device": ("auto (CUDA, else Apple MPS, else CPU) | cpu | cuda | cuda:N | mps", {}),
        "--tta": ("flip: predictions average each image and its mirror image (pays off after --augment strong, "
                  "which trains on mirror images)", {}),
        "--debug": ("show tracebacks", {}),
    }
    for flag in flags:
        help, kw = shared[flag]
        add_flag(g, flag[2:].replace("-", "_"), help, **kw)


def error_prefix() -> str:
    """Under torchrun every rank reports its own failure, so say which one."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    return f"error (rank {os.environ.get('RANK', '?')} of {world}): " if world > 1 else "error: "


def silence(stream=None) -> None:
    """Point a stream whose reader went away at devnull, as Python's documentation on SIGPIPE advises,
    so that the interpreter's own flush at exit does not fail a second time with a traceback."""
    with suppress(OSError, ValueError):  # no file behind it (captured, closed): nothing to point
        os.dup2(os.open(os.devnull, os.O_WRONLY), (stream or sys.stdout).fileno())


def run(body: Callable[[], int], debug: bool, prefix: Callable[[], str] = error_prefix,
        signals: SignalGuard | None = None) -> int:
    """body() -> its exit code; every way it can fail -> one line on stderr and the matching code."""
    warnings.formatwarning = lambda message, *_, **__: printable(f"warning: {message}") + "\n"
    try:
        try:
            code = body()
            if signals is not None and signals.received:
                raise signals.interrupted()
        except BaseException as exc:
            if signals is not None and signals.received and not isinstance(exc, Interrupted):
                raise signals.interrupted() from None
            raise
        finally:
            if sys.stdout is not None and not sys.stdout.closed:
                sys.stdout.flush()  # a vanished reader shows up here, while it can still be handled
        return code
    except BrokenPipeError:  # the reader went away (`script | head -1`): nothing to tell it
        silence()
        return 1
    except UserError as exc:
        if debug:
            raise
        print(printable(f"{prefix()}{exc}"), file=sys.stderr)
        return exc.exit_code
    except Interrupted as exc:
        with suppress(OSError):  # after a hang-up the terminal is gone: the exit code still tells
            print(printable(f"interrupted ({exc})" + (f": {exc.hint}" if exc.hint else "")), file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except Exception as exc:  # the last line of defence keeps the one-line contract
        return _unexpected(exc, debug, prefix)


def _unexpected(exc: Exception, debug: bool, prefix: Callable[[], str]) -> int:
    """An error nobody worded: its type and first line, or the advice for a known cause."""
    if debug:
        raise exc
    hint = missing_package_hint(exc)
    if hint is None and "torch" in sys.modules:  # no torch, no MPS error; and .system imports torch
        from .system import mps_hint

        hint = mps_hint(exc)
    print(printable(prefix() + (hint or f"{type(exc).__name__}: {first_line(exc)} (rerun with --debug for the "
                                        "traceback)")), file=sys.stderr)
    return 1


def missing_package_hint(exc: BaseException) -> str | None:
    """The set-up advice for a package of requirements.txt that this Python lacks; None for any other error."""
    package = (getattr(exc, "name", None) or "").partition(".")[0]
    if not isinstance(exc, ModuleNotFoundError) or package not in REQUIRED_PACKAGES:
        return None
    script = os.path.basename(sys.argv[0]) if sys.argv[0].endswith(".py") else "SCRIPT.py"
    return (f"{package} is not installed in {sys.executable}, the Python running this script: set the project "
            f"up with `bash scripts/setup.sh`, then `source .venv/bin/activate` (or run `.venv/bin/python "
            f"{script} ...`)")


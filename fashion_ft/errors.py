"""What a user is told: the errors the scripts turn into one line on stderr and an exit code, the signals
that stop a run, and a path or text made fit for one line."""
import errno
import os
import re
import signal
import threading
from contextlib import contextmanager
from pathlib import Path


def first_line(exc: BaseException, sentence: bool = False) -> str:
    """The first line of an exception's message: what a one-line report can quote of it. `sentence`: only
    its first sentence, or the exception's type when it has no message (torch's C++ writer, gloo and NCCL
    append paragraphs of context and advice)."""
    line = (str(exc).strip().splitlines() or [type(exc).__name__ if sentence else ""])[0]
    return line.split(". ")[0].rstrip(".") if sentence else line


def chain(exc: BaseException | None):
    """The exception, then what caused it (its cause, else its context), each once: a chain may loop."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        yield exc
        exc = exc.__cause__ or exc.__context__


class UserError(Exception):
    """Something the user can fix (a file, the data, a flag): exit code 1, no traceback."""

    exit_code = 1


class UsageError(UserError):
    """A bad command-line value, detected before any work: exit code 2."""

    exit_code = 2


class DivergenceError(UserError):
    """The loss became NaN or Inf (on any rank of a distributed run: every rank raises it)."""


class Interrupted(BaseException):
    """SIGINT/SIGTERM/SIGHUP stopped a run; `hint` tells the user how to go on. A BaseException, as
    KeyboardInterrupt is, so that no `except Exception` on the way (ours, torch's, a library's) eats it."""

    EXIT_CODES = {"SIGHUP": 129, "SIGINT": 130, "SIGTERM": 143}

    def __init__(self, signal_name: str, hint: str = ""):
        super().__init__(signal_name)
        self.exit_code = self.EXIT_CODES.get(signal_name, 130)
        self.hint = hint


# ---------------------------------------------------------------- SIGINT, SIGTERM and SIGHUP over the whole run

HANDLED_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)


class SignalGuard:
    def __init__(self):
        self.received: list[str] = []
        self.polling = False
        self.raised = False  # one Interrupted in all: later signals are recorded, so the way out is not torn
        self._previous: dict = {}

    def __enter__(self) -> "SignalGuard":
        self._previous = {s: signal.signal(s, self._handle) for s in HANDLED_SIGNALS
                          if s != signal.SIGHUP or signal.getsignal(s) == signal.SIG_DFL}
        return self

    def __exit__(self, *exc) -> None:
        if self.received:  # the process is ending with this interrupt: the handler, quiet now, stays for it
            return
        for s, handler in self._previous.items():
            signal.signal(s, handler)

    def _handle(self, signum, _frame) -> None:
        name = signal.Signals(signum).name
        self.received.append(name)
        if not self.raised and (len(self.received) > 1 or not self.polling):  # in the loop the first is a flag
            self.raised = True
            raise Interrupted(name)

    @contextmanager
    def polled(self):
        """Inside: signals are flags for the loop to poll (`received`)."""
        self.polling = True
        try:
            yield self.received
        finally:
            self.polling = False

    def interrupted(self) -> Interrupted:
        self.raised = True
        return Interrupted(self.received[0] if self.received else "SIGINT")


@contextmanager
def deferred():
    """Around a checkpoint's write: a signal that arrives is held, and delivered to the handlers in place
    once the write is done (or failed). Masking it would not do: torch's own threads may take it. Handlers
    belong to the main thread: elsewhere this does nothing."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    held = []
    previous = {s: h for s in HANDLED_SIGNALS if (h := signal.getsignal(s)) is not None}  # None: set outside Python
    try:
        for s in previous:
            signal.signal(s, lambda signum, _frame: held.append(signum))
        yield
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
        for signum in held:
            signal.raise_signal(signum)


# C0, DEL, C1, the line and paragraph separators and lone surrogates (from undecodable file names): each
# can end a line or drive a terminal
_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f\u2028\u2029\ud800-\udfff]")


def printable(text: str) -> str:
    """text as one terminal line: control characters escaped as Python writes them (\\n, \\x1b, \\u2028),
    so that a path given by the user cannot split a printed line; any other text, in any script, as it is."""
    return _CONTROL.sub(lambda m: repr(m[0])[1:-1], text)


def resolve_path(path: Path, flag: str) -> Path:
    """The absolute path, symlinks followed; a symlink loop is a UsageError naming `flag`."""
    resolved = Path(os.path.realpath(path))
    try:
        os.stat(resolved)
    except OSError as exc:  # absent is fine; a loop, which realpath leaves in the path, is not
        if exc.errno == errno.ELOOP:
            raise UsageError(f"{flag} {path}: symlink loop; point {flag} at a real path") from None
    return resolved

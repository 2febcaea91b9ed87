"""Errors the command-line scripts turn into one line on stderr and an exit code."""


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

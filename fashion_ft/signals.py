"""SIGINT, SIGTERM and SIGHUP over the whole run.

Every signal is recorded. Outside the epoch loop it stops the run at once (Interrupted is raised where the
program is). Inside the loop it only sets the flag that the loop polls between steps (the ranks agree on
it under torchrun), so that no step is torn in half and the last complete epoch stays resumable; a second
signal stops at once. Once the run is stopping, further signals are only recorded, and the guard leaves
that quiet handler in place until the process has ended: a signal raised in the cleanup (the lock's
release, the report) or in the interpreter's shutdown would tear it or print a traceback.

SIGHUP (the terminal closed) counts as SIGTERM where it had its default action when the guard was entered:
a run started with nohup, which ignores it, keeps running after the user logs out.

A checkpoint's write holds a signal back until the file is in place (`deferred`): torch.save's C++ writer
cannot carry an exception through, it aborts the process or leaves a torn file.

The record is what makes a signal reliable: one raised inside C++ comes back as a RuntimeError, and one
raised inside a broad handler may be swallowed; cli.run reports any end after a recorded signal as that
interrupt, and the epoch loop stops on a signal recorded before it began.
"""

import signal
import threading
from contextlib import contextmanager

from .errors import Interrupted

HANDLED_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)


class SignalGuard:
    def __init__(self):
        self.received: list[str] = []
        self.polling = False
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
        if len(self.received) == (2 if self.polling else 1):  # once; inside the loop the first one is a flag
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

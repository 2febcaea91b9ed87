"""SIGINT and SIGTERM over the whole run.

Every signal is recorded. Outside the epoch loop it also stops the run at once (Interrupted is raised
where the program is, and the atomic saves leave no half-written file). Inside the loop it only sets
the flag that the loop polls between steps, so that a step is never torn in half and the last complete
epoch stays resumable. A second signal while the flag is set stops at once.

The record is what makes a signal reliable: one raised inside C++ (torch.save's writer) comes back as a
RuntimeError, and one raised inside a broad handler may be swallowed; cli.run reports any end after a
recorded signal as that interrupt, and the epoch loop stops on a signal recorded before it began.
"""

import signal
from contextlib import contextmanager

from .errors import Interrupted

HANDLED_SIGNALS = (signal.SIGINT, signal.SIGTERM)


class SignalGuard:
    def __init__(self):
        self.received: list[str] = []
        self.polling = False
        self._previous: dict = {}

    def __enter__(self) -> "SignalGuard":
        self._previous = {s: signal.signal(s, self._handle) for s in HANDLED_SIGNALS}
        return self

    def __exit__(self, *exc) -> None:
        for s, handler in self._previous.items():
            signal.signal(s, handler)

    def _handle(self, signum, _frame) -> None:
        name = signal.Signals(signum).name
        self.received.append(name)
        if len(self.received) > 1 or not self.polling:
            raise Interrupted(name)

    @contextmanager
    def polled(self):
        """Inside: signals are flags for the loop to poll (`received`)."""
        self.polling = True
        try:
            yield self.received
        finally:
            self.polling = False

    def interrupted(self, hint: str = "") -> Interrupted:
        return Interrupted(self.received[0] if self.received else "SIGINT", hint)

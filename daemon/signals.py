"""Signal handlers that only hand the signal to the main loop's queue; restored on exit.

`medbatch run` blocks these signals from its first moment (daemon/cli/main.py); `install`
unblocks them once the handlers are set, so a SIGTERM during start-up is delivered then and
drains instead of killing the process by the default action.
"""

from __future__ import annotations

import signal
from collections.abc import Callable
from types import FrameType
from typing import Any

HANDLED = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)
_Handler = Callable[[int, FrameType | None], Any] | int | None


class SignalHandlers:
    def __init__(self, on_signal: Callable[[int], None]) -> None:
        # Called inside the handler: it must only put on a queue (SimpleQueue.put is reentrant).
        self._on_signal = on_signal
        self._previous: dict[int, _Handler] = {}

    def install(self) -> None:
        for signum in HANDLED:
            self._previous[signum] = signal.signal(signum, self._handle)
        # Whatever arrived while blocked is delivered now, to these handlers. Before any thread
        # or worker starts: they must not inherit a blocked mask.
        signal.pthread_sigmask(signal.SIG_UNBLOCK, HANDLED)

    def restore(self) -> None:
        """Put back what was there before (a test process keeps its own handlers)."""
        for signum, previous in self._previous.items():
            signal.signal(signum, previous if previous is not None else signal.SIG_DFL)
        self._previous.clear()

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        self._on_signal(signum)

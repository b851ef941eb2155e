"""Signal handlers that only put a message on the main loop's queue; restored on exit.

Installed first thing at start-up, so SIGTERM at any moment of it drains instead of killing.
"""

from __future__ import annotations

import signal
from collections.abc import Callable
from types import FrameType
from typing import Any

from daemon.messages import MessageQueue, SignalReceived

HANDLED = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)
_Handler = Callable[[int, FrameType | None], Any] | int | None


class SignalHandlers:
    def __init__(self, messages: MessageQueue) -> None:
        self._messages = messages
        self._previous: dict[int, _Handler] = {}

    def install(self) -> None:
        for signum in HANDLED:
            self._previous[signum] = signal.signal(signum, self._on_signal)

    def restore(self) -> None:
        """Put back what was there before (a test process keeps its own handlers)."""
        for signum, previous in self._previous.items():
            signal.signal(signum, previous if previous is not None else signal.SIG_DFL)
        self._previous.clear()

    def _on_signal(self, signum: int, frame: FrameType | None) -> None:
        self._messages.put(SignalReceived(signum))  # SimpleQueue.put is reentrant

"""Signal handlers that only hand the signal to the main loop's queue; restored on exit.

`capture_early()` runs before any heavy import (`python -m daemon`), so SIGTERM at any moment
of start-up is kept and replayed to the service once its handlers are installed.
"""

from __future__ import annotations

import signal
from collections.abc import Callable
from types import FrameType
from typing import Any

HANDLED = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)
_Handler = Callable[[int, FrameType | None], Any] | int | None

_early: list[int] = []
_before_early: dict[int, _Handler] = {}


def _keep(signum: int, frame: FrameType | None) -> None:
    _early.append(signum)  # list.append is atomic: safe in a handler


def capture_early() -> None:
    """Keep the signals that arrive before the service runs (replayed by `install`)."""
    for signum in HANDLED:
        _before_early[signum] = signal.signal(signum, _keep)


def release_early() -> None:
    """Not the service after all (`status`, `check-config` …): the defaults again, and any
    signal kept meanwhile delivered now."""
    for signum, previous in _before_early.items():
        signal.signal(signum, previous if previous is not None else signal.SIG_DFL)
    _before_early.clear()
    while _early:
        signal.raise_signal(_early.pop(0))


class SignalHandlers:
    def __init__(self, on_signal: Callable[[int], None]) -> None:
        # Called inside the handler: it must only put on a queue (SimpleQueue.put is reentrant).
        self._on_signal = on_signal
        self._previous: dict[int, _Handler] = {}

    def install(self) -> None:
        for signum in HANDLED:
            previous = signal.signal(signum, self._handle)
            if previous is _keep:
                previous = _before_early.get(signum, signal.SIG_DFL)
            self._previous[signum] = previous
        while _early:
            self._on_signal(_early.pop(0))

    def restore(self) -> None:
        """Put back what was there before (a test process keeps its own handlers)."""
        for signum, previous in self._previous.items():
            signal.signal(signum, previous if previous is not None else signal.SIG_DFL)
        self._previous.clear()

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        self._on_signal(signum)

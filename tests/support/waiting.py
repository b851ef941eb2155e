"""Wait on a condition with a deadline; never sleep-then-assert."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")


def wait_until(
    predicate: Callable[[], T], timeout_s: float = 30.0, interval_s: float = 0.05, message: str = ""
) -> T:
    """Return the predicate's first truthy value; fail after `timeout_s`."""
    deadline = time.monotonic() + timeout_s
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(
                f"timed out after {timeout_s}s waiting for "
                f"{message or getattr(predicate, '__name__', 'condition')}"
            )
        time.sleep(interval_s)

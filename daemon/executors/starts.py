"""Pools whose workers could not start, one after another: each next pool waits longer.

A worker whose start-up always fails (a plug-in that no longer imports, a sandbox that denies a
call the start-up needs) would otherwise be replaced at once, again and again: two interpreters
importing pandas every second, and a flood of log lines. The pool is rebuilt after 1, 2, 4 …
seconds, at most a minute apart, and said once a pool; meanwhile the service is unhealthy
(/healthz 503) and no batch is sent, so none fails an attempt. One worker that starts resets it.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Sequence
from concurrent.futures import Future, wait
from typing import Any

import structlog

from daemon.retry import backoff_s

log = structlog.get_logger()

MAX_WAIT_S = 60.0


class StartFailures:
    def __init__(self) -> None:
        self.count = 0  # consecutive pools none of whose workers started

    def watch(
        self, warm_ups: Sequence[Future[Any]], stopping: threading.Event, timeout_s: float
    ) -> set[Future[Any]]:
        """Wait for a new pool's warm-ups (at most `timeout_s`; a stop ends the wait), then
        `observe` them; the warm-ups still running."""
        deadline, late = time.monotonic() + timeout_s, set(warm_ups)
        while late and not stopping.is_set() and (left := deadline - time.monotonic()) > 0:
            _, late = wait(late, timeout=min(left, 0.2))
        self.observe(warm_ups)
        return late

    def observe(self, warm_ups: Sequence[Future[Any]]) -> None:
        """A worker that started resets the count; a pool whose every warm-up failed adds one.
        A warm-up still running (a slow start) changes nothing."""
        finished = [f for f in warm_ups if f.done() and not f.cancelled()]
        if any(f.exception() is None for f in finished):
            self.count = 0
        elif finished and len(finished) == len(warm_ups):
            self.failed(finished[0].exception())

    def failed(self, error: BaseException | None) -> None:
        """A pool that could not start at all (its workers, or the pool itself)."""
        self.count += 1
        log.error(
            "pool.workers_cannot_start",
            error=type(error).__name__,
            failed_pools=self.count,
            retry_in_s=self.delay_s(),
        )

    def delay_s(self) -> float:
        return backoff_s(self.count, MAX_WAIT_S) if self.count else 0.0

    def wait(self, stopping: threading.Event) -> bool:
        """Sleep before the next pool; True when the executor stops meanwhile."""
        delay = self.delay_s()
        return delay > 0 and stopping.wait(delay)

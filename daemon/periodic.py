"""Every apscheduler job in one place. Jobs only put messages on the main loop's queue.

In-memory job store; `coalesce=True` and `misfire_grace_time=None` so that a late tick (after a
SIGSTOP, a busy machine) runs once instead of being skipped: apscheduler 3.x skips a job that is
more than 1 s late by default. The main loop recomputes what is due from the journal's times, so
a tick carries no state and a coalesced one loses nothing.
"""

from __future__ import annotations

import queue
from dataclasses import dataclass
from typing import Any

from apscheduler.schedulers.background import BackgroundScheduler

from daemon.health import HEARTBEAT_S

__all__ = ["HEARTBEAT_S", "Heartbeat", "Periodic", "Rescan", "Tick"]


@dataclass(frozen=True, slots=True)
class Tick:
    """Seal batches whose window has passed."""


@dataclass(frozen=True, slots=True)
class Rescan:
    """List every inbox: catches events the kernel dropped."""


@dataclass(frozen=True, slots=True)
class Heartbeat:
    """Record liveness in the journal, check the watcher, ping systemd."""


class Periodic:
    def __init__(self, messages: queue.SimpleQueue[Any]) -> None:
        self._messages = messages
        self._scheduler = BackgroundScheduler(
            job_defaults={"coalesce": True, "misfire_grace_time": None, "max_instances": 1},
            timezone="UTC",
        )

    def start(self, tick_s: float, rescan_s: float, heartbeat_s: float = HEARTBEAT_S) -> None:
        self._add(Tick(), tick_s)
        self._add(Rescan(), rescan_s)
        self._add(Heartbeat(), heartbeat_s)
        self._scheduler.start()

    def reschedule(self, tick_s: float, rescan_s: float, heartbeat_s: float = HEARTBEAT_S) -> None:
        for message, seconds in (
            (Tick(), tick_s),
            (Rescan(), rescan_s),
            (Heartbeat(), heartbeat_s),
        ):
            self._scheduler.reschedule_job(
                type(message).__name__, trigger="interval", seconds=seconds
            )

    def _add(self, message: object, seconds: float) -> None:
        self._scheduler.add_job(
            self._messages.put,
            "interval",
            args=(message,),
            seconds=seconds,
            id=type(message).__name__,
        )

    def is_alive(self) -> bool:
        return bool(self._scheduler.running)

    def stop(self) -> None:
        if self._scheduler.running:
            self._scheduler.shutdown(wait=False)

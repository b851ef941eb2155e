"""What the main loop's queue carries: a closed union, handled with `match` + `assert_never`.

Threads (watcher, scheduler, pool callbacks) and signal handlers only put these on the queue.
"""

from __future__ import annotations

import queue
from concurrent.futures import Future
from dataclasses import dataclass

from daemon.models import BatchResult
from daemon.periodic import Heartbeat, Rescan, Tick
from daemon.watcher import PathSeen


@dataclass(frozen=True, slots=True)
class SignalReceived:
    signum: int


@dataclass(frozen=True, slots=True)
class BatchDone:
    batch_id: str
    future: Future[BatchResult]


@dataclass(frozen=True, slots=True)
class Archived:
    """The archiver thread finished a lot of renames: the main loop marks them disposed."""


@dataclass(frozen=True, slots=True)
class Claimed:
    """The claimer sent a chunk's outcomes back: the main loop journals them."""


Message = PathSeen | BatchDone | Archived | Claimed | SignalReceived | Tick | Rescan | Heartbeat
MessageQueue = queue.SimpleQueue[Message]

__all__ = [
    "Archived",
    "BatchDone",
    "Claimed",
    "Heartbeat",
    "Message",
    "MessageQueue",
    "PathSeen",
    "Rescan",
    "SignalReceived",
    "Tick",
]

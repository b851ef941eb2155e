"""Executors run batch tasks somewhere and report back through a callback (main loop queue)."""

from __future__ import annotations

from collections.abc import Callable
from concurrent.futures import Future
from typing import Protocol

from daemon.models import BatchResult, BatchTask

DoneCallback = Callable[[str, "Future[BatchResult]"], None]


class Executor(Protocol):
    def start(self) -> None: ...

    def submit(self, task: BatchTask) -> None: ...

    def rebuild(self) -> None: ...

    def shutdown(self, *, wait: bool) -> None: ...

"""Executors run batch tasks somewhere and report each outcome through a callback.

The callback runs on an executor thread; the service's only puts it on the main loop's queue.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from concurrent.futures import Future
from typing import Protocol

from daemon.config import Settings
from daemon.models import BatchResult, BatchTask

DoneCallback = Callable[[str, "Future[BatchResult]"], None]


class Executor(Protocol):
    def start(self) -> None:
        """Connect or spawn workers; raise MedbatchError when that is impossible."""

    def submit(self, task: BatchTask) -> Future[BatchResult]:
        """Run one attempt; its outcome arrives through the done callback, once, with the
        future returned here (a report with another future is an earlier submission's)."""

    def is_worker_loss(self, exc: BaseException) -> bool:
        """Did this attempt fail because its worker died (not because of its batch's code)?"""

    def recover(self) -> None:
        """After a worker loss: make the executor usable again (idempotent). Never blocks the
        main loop for long: a rebuild runs on a thread of the executor's own."""

    def is_healthy(self) -> bool:
        """Can it run work now (the pool is whole, the cluster reachable)?"""

    def has_lost_work(self) -> bool:
        """Can batches it holds no longer complete (a broken local pool loses its futures)?"""

    def worker_pids(self) -> list[int]:
        """Local worker processes, to kill on a timeout or a forced stop (none for remote)."""

    def reconfigure(self, workers: int, kinds: Iterable[str]) -> None: ...

    def shutdown(self, *, wait: bool) -> None: ...


def make_executor(settings: Settings, kinds: Iterable[str], on_done: DoneCallback) -> Executor:
    if settings.workers.executor == "dask":
        from daemon.executors.dask import DaskExecutor

        return DaskExecutor(settings.workers, kinds, on_done, paths=settings.paths)
    from daemon.executors.process import ProcessExecutor

    workers = settings.workers
    return ProcessExecutor(
        workers.count, kinds, on_done, workers.batch_timeout_s,
        memory_limit=workers.memory_limit, nice=workers.nice,
    )  # fmt: skip

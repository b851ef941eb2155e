"""ProcessExecutor: a spawn-context process pool, rebuilt when a dead worker breaks it.

The dispatcher never hands it more batches than it has workers, so its internal FIFO never
decides the order (CPython keeps max_workers + 1 calls queued that cannot be cancelled).
`max_tasks_per_child` is left unset: on Python 3.11 it can hang the pool (CPython gh-115634).
"""

from __future__ import annotations

import multiprocessing
from collections.abc import Iterable
from concurrent.futures import Future, ProcessPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool

import structlog

from daemon.executors import DoneCallback
from daemon.models import BatchResult, BatchTask
from daemon.worker import init_worker, run_batch, warm_up

log = structlog.get_logger()


class ProcessExecutor:
    def __init__(self, workers: int, kinds: Iterable[str], on_done: DoneCallback) -> None:
        self._workers = workers
        self._kinds = tuple(sorted(set(kinds)))
        self._on_done = on_done
        self._pool: ProcessPoolExecutor | None = None

    def start(self) -> None:
        # spawn, not fork: the main process runs watchdog and scheduler threads.
        self._pool = ProcessPoolExecutor(
            max_workers=self._workers,
            mp_context=multiprocessing.get_context("spawn"),
            initializer=init_worker,
            initargs=(self._kinds,),
        )
        # Start every worker now, so the first batch does not pay for imports.
        wait([self._pool.submit(warm_up) for _ in range(self._workers)])

    def submit(self, task: BatchTask) -> None:
        assert self._pool is not None, "start() first"
        future: Future[BatchResult] = self._pool.submit(run_batch, task)
        batch_id = task.batch.batch_id
        future.add_done_callback(lambda f: self._on_done(batch_id, f))

    def worker_pids(self) -> list[int]:
        processes = getattr(self._pool, "_processes", None) or {}
        return sorted(int(pid) for pid in processes)

    def is_worker_loss(self, exc: BaseException) -> bool:
        return isinstance(exc, BrokenProcessPool)

    def recover(self) -> None:
        """One dead worker breaks the whole pool: every running future fails with it."""
        if self._pool is not None and getattr(self._pool, "_broken", False):
            log.warning("pool.rebuilding")
            self.shutdown(wait=False)
            self.start()

    def is_healthy(self) -> bool:
        return self._pool is not None and not getattr(self._pool, "_broken", False)

    def reconfigure(self, workers: int, kinds: Iterable[str]) -> None:
        kinds = tuple(sorted(set(kinds)))
        if (workers, kinds) != (self._workers, self._kinds):
            self._workers, self._kinds = workers, kinds
            self.shutdown(wait=True)
            self.start()

    def shutdown(self, *, wait: bool) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=wait, cancel_futures=True)
            self._pool = None

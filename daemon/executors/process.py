"""ProcessExecutor: a worker pool (pebble) where one dead worker costs one batch.

With the standard library's pool, one worker killed by the OOM killer or a segfault breaks the
whole pool and fails every running batch (BrokenProcessPool), and a running task cannot be
stopped on a timeout (pebble#25). pebble reports a dead worker on the one task it was running,
with its exit code, kills a worker whose task outlives its timeout, and starts a new one.
The dispatcher never submits more batches than there are workers, so no queue inside the pool
ever decides the order. Workers are forked from a fork server (spawning.py). The first pool
starts, and a broken one is rebuilt, on a thread of its own: the main loop never waits for it
(systemd's WatchdogSec); batches submitted while the first starts wait for it, those submitted
during a rebuild fail as unavailable (uncounted).

A worker killed while it holds pebble's channel lock (taking a task, or sending a result) leaves
the lock taken for good: no worker can take a task again, and pebble never calls the pool broken
(pebble#163). A watch thread sees a task no free worker took for `stall_s`, fails the pool's
attempts as unavailable (uncounted) and rebuilds it.
"""

from __future__ import annotations

import functools
import threading
import time
from collections.abc import Callable, Iterable
from concurrent.futures import CancelledError, Future
from concurrent.futures.process import BrokenProcessPool
from typing import Any

import structlog
from pebble import ProcessExpired, ProcessPool

from daemon.audit.events import AuditEvent
from daemon.errors import ExecutorUnavailableError
from daemon.executors import DoneCallback
from daemon.executors.spawning import prepare_worker_environment, worker_context
from daemon.executors.split import SPLIT_MIN_BYTES, reads_files_apart, run_split, shares
from daemon.executors.starts import StartFailures
from daemon.models import BatchResult, BatchTask
from daemon.worker import init_worker, run_batch, warm_up

log = structlog.get_logger()

WARM_UP_TIMEOUT_S = 30.0
# A queued task that no free worker took for this long means a wedged pool; as long as a worker's
# start-up (the fork server's imports) may take under load, like the warm-up's bound.
STALL_S = 30.0


class ProcessExecutor:
    def __init__(
        self,
        workers: int,
        kinds: Iterable[str],
        on_done: DoneCallback,
        timeout_s: float,
        stall_s: float = STALL_S,
        memory_limit: int | None = None,
        nice: int = 0,
    ) -> None:
        self._workers = workers
        self._init_args = (tuple(sorted(set(kinds))), memory_limit, nice)
        self._context = worker_context(kinds)
        self._on_done = on_done
        self._timeout_s = timeout_s
        self._pool: ProcessPool | None = None
        self._retired: list[ProcessPool] = []
        self._pool_failed = False
        self._lock = threading.Lock()
        self._rebuilder: threading.Thread | None = None
        # Batches submitted and not yet reported (only to know the idle workers a split may use);
        # cleared with a broken pool, whose futures may never report.
        self._running: set[str] = set()
        # The outer future of each batch not reported yet: each is reported once, by its relay
        # or, for a wedged pool, by the stall watch.
        self._outstanding: dict[str, Future[BatchResult]] = {}
        # pebble tasks of batches not done yet → when they were queued (the stall watch).
        self._queued: dict[Future[Any], float] = {}
        self._stall_s = stall_s
        self._stopping = threading.Event()
        self._stall_watch: threading.Thread | None = None
        self._warm_up_watch: threading.Thread | None = None  # starts the pool, then watches
        # While the first pool starts: the batches submitted meanwhile, to submit when it is up.
        self._early: list[tuple[BatchTask, Future[BatchResult]]] | None = None
        self._starts = StartFailures()

    def start(self) -> None:
        """Start the workers on a thread and return at once: the fork server imports the
        processors while the start-up scan and the first claims run. Batches submitted before
        the pool is there wait for it, as they would queue behind its warm-up."""
        with self._lock:
            self._early = []
        self._warm_up_watch = threading.Thread(
            target=self._start_pool, name="medbatch-pool-start", daemon=True
        )
        self._warm_up_watch.start()
        if self._stall_watch is None:
            self._stall_watch = threading.Thread(target=self._watch_stalls, daemon=True,
                                                 name="medbatch-pool-stall-watch")  # fmt: skip
            self._stall_watch.start()

    def _start_pool(self) -> None:
        try:
            pool, warming = self._spawn_pool()
        except (RuntimeError, OSError) as exc:
            self._starts.failed(exc)
            pool, warming = None, []
        with self._lock:
            self._pool, self._pool_failed = pool, pool is None
            early, self._early = self._early or [], None
        for task, outer in early:
            self._submit(task, outer)
        if pool is None:
            self.recover()
        else:
            self._watch_warm_up(pool, warming)

    def _spawn_pool(self) -> tuple[ProcessPool, list[Future[int]]]:
        prepare_worker_environment()
        pool = ProcessPool(
            max_workers=self._workers, initializer=init_worker, initargs=self._init_args,
            context=self._context,
        )  # fmt: skip
        # One warm-up per worker starts every worker now, so the first batch does not pay for
        # the imports (init_worker loads the processors).
        return pool, [pool.schedule(warm_up) for _ in range(self._workers)]

    def _watch_warm_up(self, pool: ProcessPool, warming: list[Future[int]]) -> None:
        # Bounded: a pool that breaks while warming up never fails its queued tasks (pebble's
        # tasks_abort only covers tasks it has registered), so an unbounded wait hangs forever;
        # a late pool is marked failed, so the batches queued in it are reclaimed (has_lost_work).
        late = self._starts.watch(warming, self._stopping, WARM_UP_TIMEOUT_S)
        if not late and all(not f.cancelled() and f.exception() is None for f in warming):
            log.info("pool.ready", workers=len(warming))  # every worker imported and started
        if late and not self._stopping.is_set():
            log.warning("pool.warm_up_late", workers=len(late))
            with self._lock:
                if self._pool is pool or self._pool is None:
                    self._pool_failed = True  # the next submit or reclaim builds another

    def submit(self, task: BatchTask) -> Future[BatchResult]:
        outer: Future[BatchResult] = Future()
        with self._lock:
            if self._early is not None:  # the first pool is starting
                self._early.append((task, outer))
                return outer
        self._submit(task, outer)
        return outer

    def _submit(self, task: BatchTask, outer: Future[BatchResult]) -> None:
        batch_id = task.batch.batch_id
        try:
            with self._lock:
                pool = self._pool if self._is_usable() else None
                idle = self._workers - len(self._running)
            if pool is None:
                raise RuntimeError("pool rebuilding")
            is_big = task.batch.n_bytes >= SPLIT_MIN_BYTES and reads_files_apart(task.batch.kind)
            parts = shares(task.batch.files, idle) if is_big else []
            if len(parts) < 2:
                inner = self._schedule(pool, run_batch, task)
        except (RuntimeError, OSError) as exc:
            # A pool that cannot take work now (broken, or being rebuilt) must not stop the
            # service: the attempt fails as unavailable and is retried later, uncounted.
            log.error("pool.unavailable", error=type(exc).__name__)
            self.recover()
            outer.set_exception(ExecutorUnavailableError(f"worker pool: {type(exc).__name__}"))
            self._on_done(batch_id, outer)
            return

        def relay(done: Future[BatchResult]) -> None:
            with self._lock:
                self._running.discard(batch_id)
                if self._outstanding.get(batch_id) is not outer:
                    return  # already reported as stalled
                del self._outstanding[batch_id]
            error = CancelledError() if done.cancelled() else done.exception()
            if error is None:
                outer.set_result(done.result())
            elif isinstance(error, BrokenProcessPool | CancelledError):
                # The pool broke (pebble: a worker died with no task to blame, "All workers
                # expired") or was stopped: not this batch's doing.
                outer.set_exception(
                    ExecutorUnavailableError(f"worker pool: {type(error).__name__}")
                )
                if isinstance(error, BrokenProcessPool):
                    self.recover()  # the pool is ours to rebuild, whoever submits next
            else:
                outer.set_exception(error)
            self._on_done(batch_id, outer)

        with self._lock:
            self._running.add(batch_id)
            self._outstanding[batch_id] = outer
        if len(parts) < 2:
            inner.add_done_callback(relay)
        else:
            log.debug(AuditEvent.BATCH_SPLIT, batch_id=batch_id, shares=len(parts))
            run_split(functools.partial(self._schedule, pool), task, parts, relay)

    def _schedule(self, pool: ProcessPool, function: Callable[..., Any], *args: Any) -> Future[Any]:
        inner = pool.schedule(function, args=args, timeout=self._timeout_s)
        with self._lock:
            self._queued[inner] = time.monotonic()
        inner.add_done_callback(self._forget)
        return inner

    def _forget(self, inner: Future[Any]) -> None:
        with self._lock:
            self._queued.pop(inner, None)

    def _watch_stalls(self) -> None:
        """Also rebuilds a pool pebble gave up on while idle (a worker that dies with no task
        running breaks it): now, not on the next batch's failed attempt."""
        while not self._stopping.wait(min(1.0, self._stall_s / 4)):
            pool = self._pool  # None while a reload or a rebuild puts another in place
            if not self.check_stalled(time.monotonic()) and pool is not None and not pool.active:
                self.recover()

    def check_stalled(self, now: float) -> bool:
        """A queued task no free worker took for `stall_s`: fail every outstanding attempt as
        unavailable (uncounted) and rebuild the pool. True if it was found stalled."""
        with self._lock:
            if self._pool is None or self._pool_failed:
                return False
            waiting = [t for f, t in self._queued.items() if not (f.running() or f.done())]
            busy = sum(1 for f in self._queued if f.running())
            if not waiting or busy >= self._workers or now - min(waiting) < self._stall_s:
                return False
            self._pool_failed = True
            abandoned, self._outstanding = self._outstanding, {}
            self._queued.clear()
            self._running.clear()
        log.error(
            "pool.stalled", waiting=len(waiting), busy=busy, waited_s=round(now - min(waiting), 1)
        )
        for batch_id, outer in abandoned.items():
            outer.set_exception(ExecutorUnavailableError("worker pool: stalled"))
            self._on_done(batch_id, outer)
        self.recover()
        return True

    def is_worker_loss(self, exc: BaseException) -> bool:
        if isinstance(exc, ProcessExpired):
            log.warning("worker.lost", exitcode=exc.exitcode, pid=exc.pid)
            return True
        return False

    def recover(self) -> None:
        """A dead worker is replaced by the pool itself; a broken pool is replaced here, on a
        thread (stopping the old pool and warming up the new one take seconds)."""
        with self._lock:
            if (
                self._stopping.is_set()
                or self._early is not None  # the first pool is still starting
                or self._is_usable()
                or self._is_rebuilding()
            ):
                return  # stopping: a rebuild would stop the old pool beside `shutdown`
            self._rebuilder = threading.Thread(
                target=self._rebuild, name="medbatch-pool-rebuild", daemon=True
            )
            self._rebuilder.start()

    def _is_usable(self) -> bool:
        return self._pool is not None and bool(self._pool.active) and not self._pool_failed

    def _is_rebuilding(self) -> bool:
        return self._rebuilder is not None and self._rebuilder.is_alive()

    def _rebuild(self) -> None:
        """Stop the broken pool; start pools until one's workers start, or the executor stops."""
        log.warning("pool.rebuilding")
        with self._lock:
            old, self._pool, self._pool_failed = self._pool, None, False
            self._running.clear()
            self._queued.clear()
        while True:
            if old is not None:
                old.stop()  # type: ignore[no-untyped-call]
                old.join(timeout=10)
            if self._stopping.is_set() or self._starts.wait(self._stopping):
                return
            try:
                pool, warming = self._spawn_pool()
                self._watch_warm_up(pool, warming)
            except (RuntimeError, OSError) as exc:
                self._starts.failed(exc)
                old = None
                continue
            if pool.active:
                break
            old = pool  # not one of its workers started (its warm-up said why)
        with self._lock:
            self._pool = pool
        log.info("pool.rebuilt", workers=self._workers)

    def is_healthy(self) -> bool:
        if self._early is not None:
            return True  # starting, not broken: its batches wait for it
        return self._pool is not None and bool(self._pool.active)

    def has_lost_work(self) -> bool:
        # Futures queued in a pool that broke (or never finished warming up) never complete.
        return not self.is_healthy() or self._pool_failed

    def worker_pids(self) -> list[int]:
        manager = getattr(self._pool, "_pool_manager", None)
        workers = getattr(getattr(manager, "worker_manager", None), "workers", {})
        return sorted(int(pid) for pid in workers)

    def reconfigure(self, workers: int, kinds: Iterable[str]) -> None:
        """New kinds need nothing (workers import a processor on first use); a new worker
        count starts a new pool while the old one finishes its batches, so a reload never
        waits for them."""
        if workers != self._workers and self._pool is not None:
            self._workers = workers
            self._pool.close()  # type: ignore[no-untyped-call]
            self._retired.append(self._pool)
            self._pool = None
            self.start()

    def shutdown(self, *, wait: bool) -> None:
        """`wait`: let running batches finish; else stop the workers now."""
        with self._lock:  # no rebuild starts after this (`recover` checks under the lock)
            self._stopping.set()
            rebuilder, self._rebuilder = self._rebuilder, None
        for thread in (rebuilder, self._warm_up_watch):
            if thread is not None:
                thread.join()
        pools = [*self._retired, *([self._pool] if self._pool is not None else [])]
        # Idle workers are stopped, not asked to finish: nothing is lost, and the stop does not
        # wait for each interpreter's exit (numpy, pyarrow, scikit-image unloading).
        wait = wait and bool(self._outstanding)
        for pool in pools:
            if wait:
                pool.close()  # type: ignore[no-untyped-call]
            else:
                pool.stop()  # type: ignore[no-untyped-call]
        for pool in pools:
            pool.join()
        self._pool, self._retired = None, []

"""The batch flow: seal → dispatch → commit, or retry / split / give up. Main loop only.

Each transition is a journal commit, then one outcome event for the listeners (outcomes.py).
Which executor runs the batch is not its business: it only submits and reads outcomes.
"""

from __future__ import annotations

import errno
import time
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, replace

import structlog

from daemon.audit.names import hash_name, load_name_key
from daemon.batcher import Sealed as SealedBatch
from daemon.batcher import batch_id_for
from daemon.config import Pipeline, Settings
from daemon.dispatcher import PriorityDispatcher
from daemon.errors import BatchFailedError, ExecutorUnavailableError
from daemon.executors import Executor
from daemon.journal import Journal
from daemon.models import Batch, BatchResult, BatchTask, Reason
from daemon.outbox import remove_stale_staging
from daemon.outcomes import (
    Committed,
    GaveUp,
    Listeners,
    Retrying,
    Sealed,
    SplitUp,
    Started,
)
from daemon.retry import GiveUp, Retry, Split, decide
from daemon.rollup import Rollups

log = structlog.get_logger()

Clock = Callable[[], float]
# A batch this far past the executor's own timeout is taken as lost and retried.
LOST_AFTER_TIMEOUT_S = 30.0


@dataclass
class InFlight:
    task: BatchTask
    started: float
    # The future the executor reports this attempt with; an earlier attempt of the same batch
    # (reclaimed as lost, then retried) may still report with its own, which is not this one.
    future: Future[BatchResult] | None = None


class BatchFlow:
    def __init__(
        self,
        settings: Settings,
        journal: Journal,
        dispatcher: PriorityDispatcher,
        listeners: Listeners,
        *,
        wall: Clock = time.time,
        mono: Clock = time.monotonic,
        rollups: Rollups | None = None,
    ) -> None:
        self.settings = settings
        self.rollups = rollups
        self.executor: Executor | None = None
        # Pipelines a reload removed: their open and waiting batches finish under these settings.
        self.retired: dict[str, Pipeline] = {}
        self.inflight: dict[str, InFlight] = {}
        self._delayed: list[tuple[float, BatchTask]] = []
        self._journal = journal
        self._dispatcher = dispatcher
        self._listeners = listeners
        self._wall = wall
        self._mono = mono

    def reconfigure(self, settings: Settings) -> None:
        """A reload: removed pipelines' waiting batches finish under their old settings."""
        kept = {p.name for p in settings.pipeline}
        self.retired.update((p.name, p) for p in self.settings.pipeline if p.name not in kept)
        self.settings = settings

    @property
    def is_idle(self) -> bool:
        return not self.inflight and not self._delayed and len(self._dispatcher) == 0

    # -- seal and dispatch ----------------------------------------------------------------

    def seal(self, sealed: SealedBatch) -> None:
        self._journal.seal_batch(sealed.batch, sealed.opened_at)
        self._listeners.emit(Sealed(sealed.batch))
        self.push(sealed.batch)

    def push(self, batch: Batch) -> None:
        """Queue a sealed batch (new, re-run after a crash, or half of a split)."""
        self._dispatcher.push(self.task_for(batch))

    def task_for(self, batch: Batch) -> BatchTask:
        pipelines = {p.name: p for p in self.settings.pipeline}
        pipeline = pipelines.get(batch.pipeline) or self.retired[batch.pipeline]
        return BatchTask(
            batch=batch,
            options=pipeline.options,
            outbox_dir=self.settings.paths.outbox / batch.pipeline,
            memory_estimate=int(batch.n_bytes * pipeline.estimated_memory_factor),
            config_sha256=self.settings.config_sha256 or "",
            wants_rollup=pipeline.rollup is not None,
        )

    def dispatch(self) -> None:
        """Send the ready batches, unless the executor cannot run work now (a pool being
        rebuilt, workers that cannot start, a cluster away): they wait, with no failed attempt."""
        assert self.executor is not None
        if not self.executor.is_healthy():
            return
        # Local workers sync the journal before they publish; a remote one cannot reach it.
        wal = self._journal.wal_path if self.settings.workers.executor == "process" else None
        for task in self._dispatcher.pop_ready():
            batch_id = task.batch.batch_id
            attempt = self._journal.mark_running(batch_id, self._wall(), durable=wal is None)
            task = replace(task, batch=replace(task.batch, attempt=attempt), journal_wal=wal)
            self._listeners.emit(Started(task.batch))
            self.inflight[task.batch.batch_id] = flight = InFlight(task, self._mono())
            # Workers get the names as published (hashed), never the key nor the real names.
            flight.future = self.executor.submit(published_task(task, self.settings))

    def release_delayed(self) -> None:
        now = self._mono()
        due = [task for at, task in self._delayed if at <= now]
        self._delayed = [(at, task) for at, task in self._delayed if at > now]
        for task in due:
            self._dispatcher.push(task)

    # -- outcomes -------------------------------------------------------------------------

    def on_done(self, batch_id: str, future: Future[BatchResult]) -> None:
        flight = self.inflight.get(batch_id)
        if flight is not None and flight.future is not None and flight.future is not future:
            return  # a reclaimed attempt's late report: the batch already runs again
        self.inflight.pop(batch_id, None)
        self._dispatcher.done(batch_id)
        if flight is None:
            return  # reclaimed as lost earlier: its retry is already on its way
        run_s = self._mono() - flight.started
        try:
            result = future.result()
        except Exception as exc:
            self.on_attempt_failed(flight.task, self._failure_reason(batch_id, exc), run_s)
            return
        if self._is_staged(flight.task, result, run_s):
            self._commit(flight.task.batch, result, run_s)

    def _is_staged(self, task: BatchTask, result: BatchResult, run_s: float) -> bool:
        """A rollup's share is durable before the commit, so that a crash right after the
        commit still merges it (once); if it cannot be written, the batch is retried."""
        if self.rollups is None or not result.is_published or result.rollup is None:
            return True
        try:
            self.rollups.stage(task.batch, result)
        except OSError as exc:
            reason = (
                Reason.DISK_FULL if exc.errno in (errno.ENOSPC, errno.EDQUOT) else Reason.IO_ERROR
            )
            log.error("rollup.stage_failed", batch_id=task.batch.batch_id, reason=reason)
            self.on_attempt_failed(task, reason, run_s)
            return False
        return True

    def _commit(self, batch: Batch, result: BatchResult, run_s: float) -> None:
        now = self._wall()
        if result.is_published:
            # The archiver syncs the journal before it moves the inputs; the quarantined ones
            # are moved here, on the main loop, once the commit is durable.
            self._journal.mark_published(result, now, durable=bool(result.quarantined))
            waits = tuple(now - f.received_at for f in batch.files if f.file_id in result.facts)
        else:
            self._journal.mark_batch_quarantined(result, now)
            waits = ()
        self._listeners.emit(Committed(batch, result, run_s, waits))

    def _failure_reason(self, batch_id: str, exc: BaseException) -> str:
        assert self.executor is not None
        if isinstance(exc, BatchFailedError):
            reason = exc.reason
        elif isinstance(exc, ExecutorUnavailableError):
            self.executor.recover()
            reason = Reason.EXECUTOR_UNAVAILABLE
        elif isinstance(exc, TimeoutError):
            reason = Reason.TIMEOUT  # the pool killed the worker: running tasks cannot stop
        elif self.executor.is_worker_loss(exc):
            self.executor.recover()
            reason = Reason.WORKER_CRASH
        else:
            # Whatever else comes back (an unpicklable result, a lost connection) is a failed
            # attempt, never the end of the service.
            reason = Reason.EXECUTOR_ERROR
        log.warning(
            "batch.attempt_failed", batch_id=batch_id, reason=reason, error=type(exc).__name__
        )
        return reason

    def on_attempt_failed(self, task: BatchTask, reason: str, run_s: float | None) -> None:
        """Retry with back-off, split, or give up: `retry.decide` says which."""
        batch = task.batch
        if reason in (Reason.WORKER_CRASH, Reason.TIMEOUT):
            # Its worker is dead: nothing will finish or clean up what it was writing.
            remove_stale_staging([task.outbox_dir], batch.batch_id)
        decision = decide(
            reason, batch.attempt, len(batch.files), self.settings.workers.max_attempts
        )
        match decision:
            case Retry():
                self._retry(task, reason, decision, run_s)
            case Split():
                self._split(batch, reason, run_s)
            case GiveUp():
                self.give_up(batch, reason, run_s)

    def _retry(self, task: BatchTask, reason: str, decision: Retry, run_s: float | None) -> None:
        batch = task.batch
        self._journal.mark_sealed_again(batch.batch_id, reason, is_counted=decision.is_counted)
        self._delayed.append((self._mono() + decision.delay_s, task))
        self._listeners.emit(
            Retrying(
                batch,
                reason,
                decision.delay_s,
                decision.is_counted,
                decision.should_pause,
                run_s,
            )
        )

    def _split(self, batch: Batch, reason: str, run_s: float | None) -> None:
        """Halve a batch whose inputs killed its worker twice, to find the one that does it."""
        half = len(batch.files) // 2
        children = tuple(
            Batch(
                batch_id_for(batch.pipeline, batch.sealed_at, part),
                batch.pipeline,
                batch.kind,
                batch.priority,
                batch.sealed_at,
                part,
            )
            for part in (batch.files[:half], batch.files[half:])
        )
        self._journal.split_batch(batch.batch_id, children, reason)
        self._listeners.emit(SplitUp(batch, children, reason, run_s))
        for child in children:
            self.push(child)

    def give_up(self, batch: Batch, reason: str, run_s: float | None = None) -> None:
        """Every input of the batch goes to quarantine with the reason."""
        self._journal.mark_failed(batch.batch_id, reason, self._wall())
        self._listeners.emit(GaveUp(batch, reason, run_s))

    def reclaim_lost(self) -> None:
        """A batch the executor lost (queued in a pool that broke: its future never completes)
        is retried without counting against it; so is one far past the executor's timeout."""
        assert self.executor is not None
        limit_s = self.settings.workers.batch_timeout_s + LOST_AFTER_TIMEOUT_S
        has_lost = bool(self.inflight) and self.executor.has_lost_work()
        now = self._mono()
        for batch_id, flight in list(self.inflight.items()):
            if has_lost or now - flight.started > limit_s:
                log.error("batch.lost_in_executor", batch_id=batch_id)
                del self.inflight[batch_id]
                self._dispatcher.done(batch_id)
                self.on_attempt_failed(flight.task, Reason.EXECUTOR_UNAVAILABLE, None)
        if has_lost:
            self.executor.recover()


def published_task(task: BatchTask, settings: Settings) -> BatchTask:
    """`task` with each input's name as it may be published: its keyed hash in a `hash_names`
    pipeline (manifest names, imaging `source`), the name itself where the pipeline opts out."""
    pipeline = next((p for p in settings.pipeline if p.name == task.batch.pipeline), None)
    if pipeline is not None and not pipeline.hash_names:
        return task
    key = load_name_key(settings.paths.state)
    files = tuple(f.named(hash_name(key, f.name)) for f in task.batch.files)
    return replace(task, batch=replace(task.batch, files=files))

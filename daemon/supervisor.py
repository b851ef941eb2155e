"""Supervisor: wires the parts and runs the one main loop that owns the journal and audit log.

Threads (watcher, scheduler, pool callbacks) and signal handlers only put messages on
`self._messages`; this loop handles them in order. Start: journal check → recovery → pool →
watches → start-up scan → READY. Stop: watcher → scheduler → drain in-flight batches (up to
`graceful_timeout_s`) → pool → journal, each step an audit line.
"""

from __future__ import annotations

import contextlib
import os
import queue
import signal
import sys
import time
from collections import Counter
from concurrent.futures import Future
from dataclasses import dataclass, field, replace
from pathlib import Path
from types import FrameType

import structlog

from daemon import __version__
from daemon.audit import AuditEvent, TolerantAuditLog, load_name_key
from daemon.audit_reconcile import reconcile
from daemon.batcher import Batcher, Sealed, batch_id_for
from daemon.config import Pipeline, Settings, load_settings
from daemon.dispatcher import PriorityDispatcher
from daemon.errors import (
    BatchFailedError,
    ConfigError,
    ExecutorUnavailableError,
    MedbatchError,
)
from daemon.executors import make_executor
from daemon.intake import Intake
from daemon.journal import FileRow, Journal
from daemon.metrics import Metrics
from daemon.models import Batch, BatchResult, BatchTask, IncomingFile
from daemon.notify import Notifier
from daemon.outbox import make_folder, quarantine, remove_stale_staging
from daemon.periodic import HEARTBEAT_S, Heartbeat, Periodic, Rescan, Tick
from daemon.watcher import InboxWatcher, PathSeen
from daemon.web.server import StatusServer

log = structlog.get_logger()

# An attempt that failed on these was the disk's fault, not the batch's: it does not count,
# and intake pauses until a batch publishes again.
DISK_REASONS = frozenset({"disk_full", "io_error"})
# Not the batch's fault either (a Dask cluster out of reach): retried without counting.
UNAVAILABLE = "executor_unavailable"
# The audit log's disk refuses writes: intake and publishing pause until it takes them again.
AUDIT_UNWRITABLE = "audit_unwritable"
# Journal times and the moment the audit head was recorded come from one clock; the slack only
# covers float rounding: a line already present is never written twice (reconcile checks).
RECONCILE_SLACK_S = 2.0
# Inputs of a pipeline removed from the config while they waited: quarantined, never lost.
PIPELINE_REMOVED = "pipeline_removed"


@dataclass(frozen=True, slots=True)
class SignalReceived:
    signum: int


@dataclass(frozen=True, slots=True)
class BatchDone:
    batch_id: str
    future: Future[BatchResult]


@dataclass
class _InFlight:
    task: BatchTask
    started: float


@dataclass
class _Progress:
    published: int = 0
    quarantined: int = 0
    files_taken: int = 0
    started: float = field(default_factory=time.monotonic)


class Supervisor:
    def __init__(self, settings: Settings, *, once: bool = False) -> None:
        self.settings = settings
        self.once = once
        self._messages: queue.SimpleQueue[object] = queue.SimpleQueue()
        self._notifier = Notifier()
        self.metrics = Metrics()
        self.status_server: StatusServer | None = None
        self._stopping = False
        self._stop_now = False
        self._inflight: dict[str, _InFlight] = {}
        self._delayed: list[tuple[float, BatchTask]] = []
        self._paused: str | None = None
        # Pipelines a reload removed: their open and waiting batches finish under these settings.
        self._retired: dict[str, Pipeline] = {}
        self._progress = _Progress()
        self._last_tick = time.monotonic()
        self._is_tty = sys.stderr.isatty()

    # -- lifecycle ------------------------------------------------------------------------

    def run(self) -> int:
        """Run until stopped (or, with --once, until the inboxes are drained); exit status."""
        self._start()
        try:
            while not self._is_finished():
                self._wait_and_handle()
                self._step()
            unfinished = self.journal.unfinished_count() if self.once else 0
        finally:
            self._stop()
        if self.once:
            p = self._progress
            elapsed = time.monotonic() - p.started
            if self._is_tty:
                sys.stderr.write("\n")
            print(
                f"medbatch: {p.files_taken} files taken, {p.published} batches published, "
                f"{p.quarantined} files quarantined, {unfinished} unfinished, "
                f"in {elapsed:.1f} s"
            )
        return 1 if unfinished else 0

    def _start(self) -> None:
        paths = self.settings.paths
        for folder in (paths.state, paths.spool, paths.outbox, paths.quarantine, paths.archive):
            folder.mkdir(parents=True, exist_ok=True, mode=0o750)
        self._check_filesystems()
        self.journal = Journal(paths.journal)
        self.audit = TolerantAuditLog(paths.audit)
        self.audit.set_hashed_pipelines(self._hashed_pipelines(), self._name_key(self.settings))
        self.audit.add_listener(self.metrics.on_audit)
        self.audit.append(
            AuditEvent.DAEMON_STARTED, pid=os.getpid(), version=__version__, once=self.once or None
        )
        self.intake = Intake(self.settings, self.journal, self.audit)
        self.batcher = Batcher(self._pipelines())
        workers = self.settings.workers
        self.dispatcher = PriorityDispatcher(
            workers.count, workers.memory_budget, self.settings.dispatch.aging_s
        )
        self._recover()
        self.executor = make_executor(self.settings, self._kinds(), self._on_done)
        self.executor.start()
        self._install_signal_handlers()
        if self.settings.service.metrics_address:
            self.status_server = StatusServer(self.settings, self.metrics)
            self.status_server.start(self.settings.service.metrics_address)
        self.watcher = InboxWatcher(self._messages)
        if not self.once:
            self.watcher.start(self._inbox_folders())
        found = self.intake.scan()
        self.periodic = Periodic(self._messages)
        service = self.settings.service
        self.periodic.start(service.tick_s, service.rescan_s, self._heartbeat_s())
        self._heartbeat()
        self.audit.sync()
        log.info(
            "daemon.ready",
            pipelines=len(self.settings.pipeline),
            backlog=found,
            workers=workers.count,
        )
        self._notifier.ready()

    def _check_filesystems(self) -> None:
        paths = self.settings.paths
        for p in self.settings.pipeline:
            (paths.inbox / p.name).mkdir(parents=True, exist_ok=True)
        if os.stat(paths.inbox).st_dev != os.stat(paths.spool).st_dev:
            raise ConfigError(
                "paths.state",
                "must be on the same filesystem as paths.inbox "
                "(claiming a file is a rename into state/spool)",
            )

    def _stop(self) -> None:
        self._notifier.stopping()
        with contextlib.suppress(AttributeError):
            self.watcher.stop()
        with contextlib.suppress(AttributeError):
            self.periodic.stop()
        if not hasattr(self, "executor"):
            return
        self._drain()
        self.executor.shutdown(wait=not self._inflight)
        self.audit.append(
            AuditEvent.DAEMON_STOPPED, pid=os.getpid(), interrupted=len(self._inflight) or None
        )
        # After the last line, so that the journal's head is the log's end: cutting off even
        # daemon.stopped is then found by `audit verify`.
        self._record_heartbeat(stopped=True)
        self.audit.close()
        self.journal.close()
        if self.status_server is not None:
            self.status_server.close()
        log.info("daemon.stopped", interrupted=len(self._inflight))

    def _drain(self) -> None:
        """Finish in-flight batches, up to the graceful timeout (or a second SIGTERM)."""
        if not self._inflight:
            return
        self.audit.append(AuditEvent.DAEMON_DRAINING, in_flight=len(self._inflight))
        self.audit.sync()
        deadline = time.monotonic() + self.settings.service.graceful_timeout_s
        while self._inflight and not self._stop_now:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                break
            with contextlib.suppress(queue.Empty):
                self._handle(self._messages.get(timeout=min(remaining, 1.0)), draining=True)
        if self._inflight:
            log.warning("daemon.drain_timeout", in_flight=len(self._inflight))
            # Running tasks cannot be cancelled: shutdown stops their workers, and the next
            # start re-runs their batches (they are still "running" in the journal).

    def _is_finished(self) -> bool:
        if self._stopping:
            return True
        if not self.once:
            return False
        return (
            self.intake.pending == 0
            and not self.batcher.open_batches()
            and len(self.dispatcher) == 0
            and not self._inflight
            and not self._delayed
        )

    # -- signals --------------------------------------------------------------------------

    def _install_signal_handlers(self) -> None:
        for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            signal.signal(signum, self._on_signal)

    def _on_signal(self, signum: int, frame: FrameType | None) -> None:
        self._messages.put(SignalReceived(signum))  # SimpleQueue.put is reentrant

    def _handle_signal(self, signum: int) -> None:
        if signum == signal.SIGHUP:
            self._reload()
        elif self._stopping:
            self._stop_now = True
            log.warning("daemon.stop_now")
        else:
            self._stopping = True
            log.info("daemon.stopping", signal=signal.Signals(signum).name)

    # -- the loop -------------------------------------------------------------------------

    def _wait_and_handle(self) -> None:
        due = self.intake.next_due()
        timeout = None if due is None else max(0.0, due - time.monotonic())
        if self.once and timeout is None:
            timeout = 0.2
        try:
            message = self._messages.get(timeout=timeout)
        except queue.Empty:
            return
        self._handle(message)
        # Take whatever else is waiting, so a burst of events costs one step.
        for _ in range(100_000):
            try:
                self._handle(self._messages.get_nowait())
            except queue.Empty:
                return

    def _handle(self, message: object, *, draining: bool = False) -> None:
        if isinstance(message, PathSeen):
            if not draining:
                self.intake.offer(message.pipeline, message.path, is_writing=message.is_writing)
        elif isinstance(message, BatchDone):
            self._on_batch_done(message.batch_id, message.future)
        elif isinstance(message, SignalReceived):
            self._handle_signal(message.signum)
        elif isinstance(message, Tick):
            self._last_tick = time.monotonic()
        elif isinstance(message, Rescan) and not draining:
            found = self.intake.scan()
            if found:
                log.info("intake.rescan_found", files=found)
        elif isinstance(message, Heartbeat):
            self._heartbeat()

    def _step(self) -> None:
        if self._stopping:
            return
        now = time.time()
        sealed: list[Sealed] = []
        if not self._paused:
            for incoming in self.intake.take_settled():
                sealed += self._admit(incoming, now)
        sealed += self.batcher.seal_due(now)
        if self.once and self.intake.pending == 0:
            sealed += self.batcher.seal_all(now)
        for s in sealed:
            self._seal(s)
        self._release_delayed()
        if self._paused != AUDIT_UNWRITABLE:
            # Nothing is published while its audit line could not be written.
            self._dispatch()
        self.audit.sync()
        if self.audit.failing_since is not None:
            self._pause(AUDIT_UNWRITABLE)
        self.metrics.set_queue_depth(Counter(t.batch.priority for t in self.dispatcher.waiting))
        self.metrics.set_in_flight(len(self._inflight))
        self._report_progress()

    def _admit(self, incoming: IncomingFile, now: float) -> list[Sealed]:
        self._progress.files_taken += 1
        pipeline = self._pipelines().get(incoming.pipeline)
        if pipeline is not None and pipeline.duplicates == "skip":
            earlier = self.journal.publisher_of(incoming.pipeline, incoming.sha256)
            if earlier is not None:
                self.journal.mark_duplicates([(incoming.file_id, earlier)])
                self.audit.append(
                    AuditEvent.FILE_DUPLICATE,
                    pipeline=incoming.pipeline,
                    file_id=incoming.file_id,
                    sha256=incoming.sha256,
                    batch_id=earlier,
                )
                self._dispose()
                return []
        if pipeline is None:
            return []
        return self.batcher.add(incoming, now)

    def _seal(self, sealed: Sealed) -> None:
        batch = sealed.batch
        self.journal.seal_batch(batch, sealed.opened_at)
        self.audit.append(
            AuditEvent.BATCH_SEALED,
            pipeline=batch.pipeline,
            batch_id=batch.batch_id,
            files=len(batch.files),
            bytes=batch.n_bytes,
            priority=batch.priority,
        )
        self.dispatcher.push(self._task(batch))

    def _task(self, batch: Batch) -> BatchTask:
        pipeline = self._pipelines().get(batch.pipeline) or self._retired[batch.pipeline]
        return BatchTask(
            batch=batch,
            options=pipeline.options,
            outbox_dir=self.settings.paths.outbox / batch.pipeline,
            memory_estimate=int(batch.n_bytes * pipeline.estimated_memory_factor),
        )

    def _dispatch(self) -> None:
        for task in self.dispatcher.pop_ready():
            batch = task.batch
            attempt = self.journal.mark_running(batch.batch_id, time.time())
            task = BatchTask(
                Batch(
                    batch.batch_id,
                    batch.pipeline,
                    batch.kind,
                    batch.priority,
                    batch.sealed_at,
                    batch.files,
                    attempt,
                ),
                task.options,
                task.outbox_dir,
                task.memory_estimate,
            )
            self.audit.append(
                AuditEvent.BATCH_STARTED,
                pipeline=batch.pipeline,
                batch_id=batch.batch_id,
                attempt=attempt,
            )
            self._inflight[batch.batch_id] = _InFlight(task, time.monotonic())
            self.executor.submit(task)

    def _on_done(self, batch_id: str, future: Future[BatchResult]) -> None:
        """Pool thread: hand the outcome to the main loop."""
        self._messages.put(BatchDone(batch_id, future))

    # -- outcomes -------------------------------------------------------------------------

    def _on_batch_done(self, batch_id: str, future: Future[BatchResult]) -> None:
        flight = self._inflight.pop(batch_id, None)
        self.dispatcher.done(batch_id)
        if flight is None:
            return
        batch, run_s = flight.task.batch, time.monotonic() - flight.started
        try:
            result = future.result()
        except Exception as exc:
            self.metrics.batch_finished(batch.pipeline, run_s)
            self._on_attempt_failed(flight.task, self._failure_reason(batch_id, exc))
            return
        self._commit(batch, result)
        now = time.time()
        waits = [now - f.received_at for f in batch.files if f.file_id in result.facts]
        self.metrics.batch_finished(batch.pipeline, run_s, waits if result.is_published else [])
        if self._paused in DISK_REASONS:
            self._resume()

    def _failure_reason(self, batch_id: str, exc: BaseException) -> str:
        if isinstance(exc, BatchFailedError):
            reason = exc.reason
        elif isinstance(exc, ExecutorUnavailableError):
            self.executor.recover()
            reason = UNAVAILABLE
        elif isinstance(exc, TimeoutError):
            reason = "timeout"  # the pool killed the worker: running tasks cannot be cancelled
            self.metrics.worker_restarted()
        elif self.executor.is_worker_loss(exc):
            self.executor.recover()
            self.metrics.worker_restarted()
            reason = "worker_crash"
        else:
            # Whatever else comes back (an unpicklable result, a lost connection) is a failed
            # attempt, never the end of the service.
            reason = "executor_error"
        log.warning(
            "batch.attempt_failed", batch_id=batch_id, reason=reason, error=type(exc).__name__
        )
        return reason

    def _on_attempt_failed(self, task: BatchTask, reason: str) -> None:
        """Retry with back-off; split a batch that kills its worker twice; give up at last."""
        batch = task.batch
        if reason in ("worker_crash", "timeout"):
            # Its worker is dead: nothing will finish or clean up what it was writing.
            remove_stale_staging([self.settings.paths.outbox / batch.pipeline], batch.batch_id)
        if reason in DISK_REASONS:
            self._pause(reason)
            self._retry(task, reason, is_counted=False)
        elif reason == UNAVAILABLE:
            self._retry(task, reason, is_counted=False)
        elif reason == "worker_crash" and batch.attempt >= 2 and len(batch.files) > 1:
            self._split(batch, reason)
        elif batch.attempt < self._max_attempts(reason):
            self._retry(task, reason)
        else:
            self._fail(batch, reason)

    def _max_attempts(self, reason: str) -> int:
        return 2 if reason in ("timeout", "worker_crash") else self.settings.workers.max_attempts

    def _retry(self, task: BatchTask, reason: str, *, is_counted: bool = True) -> None:
        batch = task.batch
        self.journal.mark_sealed_again(batch.batch_id, reason, is_counted=is_counted)
        delay_s = min(2.0 ** max(batch.attempt - 1, 0), 5.0 if not is_counted else 60.0)
        self.audit.append(
            AuditEvent.BATCH_RETRIED,
            pipeline=batch.pipeline,
            batch_id=batch.batch_id,
            attempt=batch.attempt,
            reason=reason,
            delay_s=delay_s,
        )
        self._delayed.append((time.monotonic() + delay_s, task))

    def _split(self, batch: Batch, reason: str) -> None:
        """Halve a batch whose inputs killed its worker twice, to find the one that does it."""
        half = len(batch.files) // 2
        children = [
            Batch(
                batch_id_for(batch.pipeline, batch.sealed_at, part),
                batch.pipeline,
                batch.kind,
                batch.priority,
                batch.sealed_at,
                part,
            )
            for part in (batch.files[:half], batch.files[half:])
        ]
        self.journal.split_batch(batch.batch_id, children, reason)
        self.audit.append(
            AuditEvent.BATCH_SPLIT,
            pipeline=batch.pipeline,
            batch_id=batch.batch_id,
            reason=reason,
            into=[c.batch_id for c in children],
        )
        for child in children:
            self.dispatcher.push(self._task(child))

    def _commit(self, batch: Batch, result: BatchResult) -> None:
        now = time.time()
        if result.is_published:
            self.journal.mark_published(result, now)
            self.audit.append(
                AuditEvent.BATCH_PUBLISHED,
                pipeline=batch.pipeline,
                batch_id=batch.batch_id,
                files=len(result.facts),
                quarantined=len(result.quarantined),
                folder=str(result.folder),
            )
            self._progress.published += 1
        else:
            self.journal.mark_batch_quarantined(result, now)
            self.audit.append(
                AuditEvent.BATCH_FAILED,
                pipeline=batch.pipeline,
                batch_id=batch.batch_id,
                reason="every_input_quarantined",
            )
        by_id = {f.file_id: f for f in batch.files}
        for file_id, (reason, _) in result.quarantined.items():
            self.audit.append(
                AuditEvent.FILE_QUARANTINED,
                pipeline=batch.pipeline,
                batch_id=batch.batch_id,
                file_id=file_id,
                sha256=by_id[file_id].sha256,
                reason=reason,
            )
        self._progress.quarantined += len(result.quarantined)
        self.audit.sync()
        self._dispose()

    def _fail(self, batch: Batch, reason: str) -> None:
        """Give up: every input of the batch goes to quarantine with the reason."""
        self.journal.mark_failed(batch.batch_id, reason, time.time())
        self.audit.append(
            AuditEvent.BATCH_FAILED,
            pipeline=batch.pipeline,
            batch_id=batch.batch_id,
            reason=reason,
            attempts=batch.attempt,
        )
        for f in batch.files:
            self.audit.append(
                AuditEvent.FILE_QUARANTINED,
                pipeline=batch.pipeline,
                batch_id=batch.batch_id,
                file_id=f.file_id,
                sha256=f.sha256,
                reason=reason,
            )
        self._progress.quarantined += len(batch.files)
        self.audit.sync()
        self._dispose()

    def _pause(self, reason: str) -> None:
        """Out of disk (or failing): stop taking files until a retried batch publishes."""
        if self._paused == reason:
            return
        self._paused = reason
        log.error("intake.paused", reason=reason)
        self.audit.append(AuditEvent.INTAKE_PAUSED, reason=reason)
        self.journal.set_meta(paused=reason)

    def _resume(self) -> None:
        log.info("intake.resumed", after=self._paused)
        self.audit.append(AuditEvent.INTAKE_RESUMED, after=self._paused)
        self._paused = None
        self.journal.set_meta(paused=None)

    def _release_delayed(self) -> None:
        now = time.monotonic()
        due = [task for at, task in self._delayed if at <= now]
        self._delayed = [(at, task) for at, task in self._delayed if at > now]
        for task in due:
            self.dispatcher.push(task)

    def _dispose(self) -> None:
        """Move terminal inputs out of the spool: archive (or delete) or quarantine.

        Idempotent, after the journal commit: a crash in between is finished by recovery.
        """
        rows = self.journal.undisposed()
        archives: dict[Path, None] = {}
        for row in rows:
            source = self.settings.paths.spool / row.spool_name
            pipeline = self._pipelines().get(row.pipeline)
            try:
                if row.state == "quarantined":
                    self._quarantine(row, source)
                elif pipeline is not None and pipeline.after_publish == "delete":
                    source.unlink()
                else:
                    day = time.strftime("%Y-%m-%d", time.gmtime(row.received_at))
                    folder = self.settings.paths.archive / row.pipeline / day
                    if folder not in archives:
                        make_folder(folder)
                        archives[folder] = None
                    # Spool names are unique: the archived copy keeps it, nothing to compare.
                    os.rename(source, folder / source.name)
            except FileNotFoundError:
                continue  # moved before a crash, after the journal commit: already done
        if rows:
            self.journal.mark_disposed(r.id for r in rows)

    def _quarantine(self, row: FileRow, source: Path) -> None:
        detail = self.journal.file_facts(row.id).get("detail", "")
        quarantine(
            source,
            self.settings.paths.quarantine / row.pipeline,
            row.name,
            {
                "name": row.name,
                "pipeline": row.pipeline,
                "reason": row.reason,
                "detail": detail,
                "sha256": row.sha256,
                "size": row.size,
                "batch_id": row.batch_id,
                "quarantined_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            },
        )

    # -- recovery -------------------------------------------------------------------------

    def _recover(self) -> None:
        """Finish what a crash interrupted; every step is idempotent."""
        paths = self.settings.paths
        stale = remove_stale_staging(paths.outbox / p.name for p in self.settings.pipeline)
        adopted = self.intake.adopt_orphans()
        claims = self.intake.finish_interrupted_claims()
        # A kill between a journal commit and its audit line loses the line: rebuild it, from
        # the last recorded head on (and for every claim finished just now).
        head_at = self.journal.meta("audit_head_at")
        since = float(head_at) if head_at else 0.0
        since = min([since, *(c.received_at for c in claims)]) - RECONCILE_SLACK_S
        rebuilt = reconcile(self.journal, self.audit, paths.audit, max(since, 0.0))
        self._dispose()
        rerun = removed = 0
        for row in self.journal.unfinished_batches():
            if row.state == "running":
                # Interrupted by the crash or stop, not failed: that attempt does not count.
                self.journal.mark_sealed_again(row.id, "interrupted", is_counted=False)
                row = replace(row, attempts=row.attempts - 1)
            files = [
                self._incoming(f) for f in self.journal.batch_files(row.id) if f.state == "batched"
            ]
            if row.pipeline not in self._pipelines():
                # Removed from the config while the service was down: nothing can run it.
                self.journal.mark_failed(row.id, PIPELINE_REMOVED, time.time())
                removed += len(files)
                continue
            if not files:
                continue
            pipeline = self._pipelines()[row.pipeline]
            batch = Batch(
                row.id,
                row.pipeline,
                pipeline.kind,
                row.priority,
                row.sealed_at,
                tuple(files),
                row.attempts,
            )
            self.dispatcher.push(self._task(batch))
            rerun += 1
        reopened = 0
        orphans = []
        for received in self.journal.received():
            if received.pipeline not in self._pipelines():
                orphans.append(received.id)
                continue
            for s in self.batcher.add(self._incoming(received), time.time()):
                self._seal(s)
            reopened += 1
        if orphans:
            self.journal.quarantine_received(orphans, PIPELINE_REMOVED, time.time())
            removed += len(orphans)
        if removed:
            reconcile(self.journal, self.audit, paths.audit, time.time() - RECONCILE_SLACK_S)
            self._dispose()
        found = {
            "stale_staging": stale,
            "claims_finished": len(claims),
            "orphans_adopted": adopted,
            "batches_rerun": rerun,
            "files_rebatched": reopened,
            "audit_lines_rebuilt": rebuilt,
            "files_of_removed_pipelines": removed,
        }
        if any(found.values()):
            self.audit.append(AuditEvent.DAEMON_RECOVERED, **found)
            log.info("daemon.recovered", **found)

    def _incoming(self, row: FileRow) -> IncomingFile:
        return IncomingFile(
            row.id,
            row.pipeline,
            row.name,
            self.settings.paths.spool / row.spool_name,
            row.sha256 or "",
            row.size or 0,
            row.received_at,
        )

    # -- heartbeat, reload ----------------------------------------------------------------

    def _heartbeat_s(self) -> float:
        interval = self._notifier.watchdog_interval_s
        return min(HEARTBEAT_S, interval) if interval else HEARTBEAT_S

    def _is_healthy(self) -> bool:
        """Watches set, scheduler ticking: otherwise stop pinging systemd's watchdog."""
        tick_late = time.monotonic() - self._last_tick > max(
            10.0, 20 * self.settings.service.tick_s
        )
        watcher_ok = self.once or self.watcher.is_alive()
        return watcher_ok and self.periodic.is_alive() and not tick_late

    def _reclaim_lost_batches(self) -> None:
        """A batch the executor lost (queued in a pool that broke: its future never completes)
        is retried on a new pool without counting against it; so is one far past the
        executor's own timeout."""
        limit_s = self.settings.workers.batch_timeout_s + 30
        # Only a local pool loses futures for good; a Dask attempt may still complete later.
        is_broken = (
            self.settings.workers.executor == "process"
            and bool(self._inflight)
            and not self.executor.is_healthy()
        )
        now = time.monotonic()
        for batch_id, flight in list(self._inflight.items()):
            if is_broken or now - flight.started > limit_s:
                log.error("batch.lost_in_executor", batch_id=batch_id)
                del self._inflight[batch_id]
                self.dispatcher.done(batch_id)
                self._on_attempt_failed(flight.task, "executor_unavailable")
        if is_broken:
            self.executor.recover()

    def _heartbeat(self) -> None:
        self._reclaim_lost_batches()
        if self._paused == AUDIT_UNWRITABLE:
            self._retry_audit()
        if not self.once and not self.watcher.is_alive():
            log.error("watcher.dead_restarting")
            self.watcher.restart(self._inbox_folders())
            self.intake.scan()
        healthy = self._is_healthy()
        # A paused intake or an unreachable cluster is degraded, not hung: keep feeding the
        # watchdog, but let `status` say so.
        workers_ok = self.executor.is_healthy()
        self._record_heartbeat(
            stopped=False,
            healthy=healthy and workers_ok and not self._paused,
            workers_ok=workers_ok,
            watches_ok=self.once or self.watcher.is_alive(),
        )
        if healthy:
            self._notifier.watchdog()
        self._notifier.status(
            f"{self.intake.pending} settling, {len(self.dispatcher)} waiting, "
            f"{len(self._inflight)} in flight, {self._progress.published} published"
        )

    def _retry_audit(self) -> None:
        """The audit disk refused a line: once it writes again, rebuild what was lost."""
        since = self.audit.recover()
        if since is None:
            return
        rebuilt = reconcile(
            self.journal, self.audit, self.settings.paths.audit, since - RECONCILE_SLACK_S
        )
        log.info("audit.recovered", lines_rebuilt=rebuilt)
        self._resume()

    def _record_heartbeat(self, *, stopped: bool, healthy: bool = True, **checks: bool) -> None:
        # The journal's head must never be ahead of what is durable in the log (AuditLog.head).
        self.audit.sync()
        head = {}
        if self.audit.failing_since is None:
            head = {"audit_head": list(self.audit.head), "audit_head_at": time.time()}
        self.journal.set_meta(
            heartbeat=None if stopped else time.time(),
            pid=os.getpid(),
            healthy=healthy,
            heartbeat_s=self._heartbeat_s(),
            **checks,
            **head,
        )

    def _reload(self) -> None:
        self._notifier.reloading()
        path = self.settings.config_path
        try:
            if path is None:
                raise ConfigError("config", "no config file to reload")
            settings = load_settings(path)
            if settings.paths != self.settings.paths:
                raise ConfigError("paths", "paths cannot change on reload; restart the service")
            name_key = self._name_key(settings)
        except MedbatchError as exc:
            log.error("config.rejected", error=str(exc))
            self.audit.append(AuditEvent.CONFIG_REJECTED, reason=str(exc))
            self._notifier.ready()
            return
        kept = {p.name for p in settings.pipeline}
        self._retired.update((p.name, p) for p in self.settings.pipeline if p.name not in kept)
        self.settings = settings
        self.audit.set_hashed_pipelines(self._hashed_pipelines(), name_key)
        self.intake.reconfigure(settings)
        self.batcher.reconfigure(self._pipelines())
        workers = settings.workers
        self.dispatcher.reconfigure(workers.count, workers.memory_budget, settings.dispatch.aging_s)
        self.executor.reconfigure(workers.count, self._kinds())
        self.watcher.restart(self._inbox_folders())
        self.periodic.reschedule(
            settings.service.tick_s, settings.service.rescan_s, self._heartbeat_s()
        )
        self.intake.scan()
        self.audit.append(
            AuditEvent.CONFIG_RELOADED, pipelines=len(settings.pipeline), workers=workers.count
        )
        log.info("config.reloaded", pipelines=len(settings.pipeline))
        self._notifier.ready()

    # -- helpers --------------------------------------------------------------------------

    def _pipelines(self) -> dict[str, Pipeline]:
        return {p.name: p for p in self.settings.pipeline}

    def _hashed_pipelines(self) -> frozenset[str]:
        return frozenset(p.name for p in self.settings.pipeline if p.hash_names)

    @staticmethod
    def _name_key(settings: Settings) -> bytes | None:
        """The audit name key, created on first use (a pipeline with hash_names = true)."""
        if not any(p.hash_names for p in settings.pipeline):
            return None
        return load_name_key(settings.paths.state)

    def _kinds(self) -> list[str]:
        return [p.kind for p in self.settings.pipeline]

    def _inbox_folders(self) -> dict[str, Path]:
        return {p.name: self.settings.paths.inbox / p.name for p in self.settings.pipeline}

    def _report_progress(self) -> None:
        if not (self.once and self._is_tty):
            return
        elapsed = max(time.monotonic() - self._progress.started, 1e-6)
        p = self._progress
        sys.stderr.write(
            f"\r{p.files_taken} files taken, {p.published} batches published, "
            f"{p.quarantined} quarantined, {p.files_taken / elapsed:.0f} files/s "
        )
        sys.stderr.flush()

"""Service: wires the parts and runs the one main loop that owns the journal and the audit log.

Like uvicorn's `Server`: signal handlers first, then start-up (journal → recovery → pool →
watches → start-up scan → READY), the loop, then an ordered stop (watcher → scheduler → drain
in-flight batches up to `graceful_timeout_s` → pool → journal). Handlers are restored on exit.
"""

from __future__ import annotations

import contextlib
import os
import queue
import signal
import time
from collections import Counter
from concurrent.futures import Future
from pathlib import Path
from typing import assert_never

import structlog

from daemon import __version__
from daemon.audit import TolerantAuditLog, load_name_key
from daemon.audit.events import (
    ConfigRejected,
    ConfigReloaded,
    DaemonDraining,
    DaemonStarted,
    DaemonStopped,
    FileDuplicate,
)
from daemon.audit.reconcile import reconcile
from daemon.batch_flow import BatchFlow
from daemon.batcher import Batcher, Sealed
from daemon.config import Pipeline, Settings, load_settings
from daemon.console import OnceConsole
from daemon.dispatcher import PriorityDispatcher
from daemon.disposal import Disposal
from daemon.errors import ConfigError, MedbatchError
from daemon.executors import Executor, make_executor
from daemon.health import HEARTBEAT_S, Health, write_health
from daemon.intake import Intake
from daemon.journal import Journal
from daemon.messages import (
    BatchDone,
    Heartbeat,
    Message,
    MessageQueue,
    PathSeen,
    Rescan,
    SignalReceived,
    Tick,
)
from daemon.metrics import Metrics
from daemon.models import BatchResult, IncomingFile, Reason
from daemon.notify import Notifier
from daemon.outcome_listeners import (
    AuditTrail,
    DisposalListener,
    IntakeGate,
    MetricsListener,
    NotifyListener,
    OperationalLog,
    Progress,
)
from daemon.outcomes import Listeners
from daemon.periodic import Periodic
from daemon.recovery import RECONCILE_SLACK_S, Recovery
from daemon.signals import SignalHandlers
from daemon.watcher import InboxWatcher

log = structlog.get_logger()


class _StopDuringStart(Exception):
    """SIGTERM arrived during start-up: skip the remaining steps and stop in order."""


class Service:
    def __init__(self, settings: Settings, *, once: bool = False) -> None:
        self.settings = settings
        self.once = once
        self._messages: MessageQueue = queue.SimpleQueue()
        self._signals = SignalHandlers(lambda signum: self._messages.put(SignalReceived(signum)))
        self._notifier = Notifier()
        self.metrics = Metrics()
        self.progress = Progress()
        self._stopping = self._stop_now = self._is_ready = self._reload_pending = False
        self._last_tick = time.monotonic()
        self.journal: Journal | None = None
        self.audit: TolerantAuditLog | None = None
        self.executor: Executor | None = None
        self.watcher: InboxWatcher | None = None
        self.periodic: Periodic | None = None

    # -- lifecycle ------------------------------------------------------------------------

    def run(self) -> int:
        """Run until stopped (or, with --once, until the inboxes are drained); exit status."""
        # First of all, so that SIGTERM at any moment of start-up stops cleanly.
        self._signals.install()
        console = OnceConsole(self.progress) if self.once else None
        unfinished = left = 0
        try:
            try:
                self._start()
            except _StopDuringStart:
                log.info("daemon.stopped_during_start")
            while not self._is_finished():
                self._wait_and_handle()
                self._step()
                if console is not None:
                    console.report()
            if self.once and self.journal is not None:
                unfinished = self.journal.unfinished_count()
                left = int(getattr(self.intake, "left_in_inbox", 0))
        finally:
            try:
                self._stop()
            finally:
                self._signals.restore()
        if console is not None:
            console.summary(unfinished, left)
        return 1 if unfinished or left else 0

    def _start(self) -> None:
        paths, workers = self.settings.paths, self.settings.workers
        log.info(
            "daemon.starting",
            version=__version__,
            config=str(self.settings.config_path),
            pipelines=[p.name for p in self.settings.pipeline],
            workers=workers.count,
            executor=workers.executor,
            once=self.once,
        )
        for folder in (paths.state, paths.spool, paths.outbox, paths.quarantine, paths.archive):
            folder.mkdir(parents=True, exist_ok=True, mode=0o750)
        self._check_filesystems()
        self._checkpoint()
        self.journal = journal = Journal(paths.journal)
        self.audit = audit = TolerantAuditLog(paths.audit)
        audit.set_hashed_pipelines(self._hashed_pipelines(), _name_key(self.settings))
        audit.add_listener(self.metrics.on_audit)
        audit.record(DaemonStarted(pid=os.getpid(), version=__version__, once=self.once or None))
        self.intake = Intake(self.settings, journal, audit)
        self.batcher = Batcher(self._pipelines())
        self.dispatcher = PriorityDispatcher(
            workers.count, workers.memory_budget, self.settings.dispatch.aging_s
        )
        self.gate = IntakeGate(audit, journal)
        self.disposal = disposal = Disposal(paths, journal, self._pipelines)
        listeners = Listeners(
            [
                AuditTrail(audit),
                MetricsListener(self.metrics),
                self.gate,
                OperationalLog(),
                self.progress,
                NotifyListener(self._notifier, self.progress),
                DisposalListener(disposal),
            ]
        )
        self.flow = BatchFlow(self.settings, journal, self.dispatcher, listeners)
        self._checkpoint()
        Recovery(
            self.settings, journal, audit, self.intake, self.batcher, self.flow, disposal
        ).run()
        self._checkpoint()
        self.executor = make_executor(self.settings, self._kinds(), self._on_done)
        self.flow.executor = self.executor
        self.executor.start()
        self._checkpoint()
        if self.settings.service.metrics_address:
            self.metrics.serve(self.settings.service.metrics_address)
        backlog = self._start_watching()
        self._heartbeat()
        audit.sync()
        self._is_ready = True
        log.info(
            "daemon.ready",
            pipelines=len(self.settings.pipeline),
            backlog=backlog,
            workers=workers.count,
        )
        self._notifier.ready()
        if self._reload_pending:
            self._reload()

    def _start_watching(self) -> int:
        self.watcher = InboxWatcher(self._messages)
        if not self.once:
            self.watcher.start(self._inbox_folders())
        self._checkpoint()
        found = self.intake.scan()
        self.periodic = Periodic(self._messages)
        service = self.settings.service
        self.periodic.start(service.tick_s, service.rescan_s, self._heartbeat_s())
        return found

    def _checkpoint(self) -> None:
        """Handle what arrived during start-up; a stop request ends the start-up here."""
        while True:
            try:
                self._handle(self._messages.get_nowait())
            except queue.Empty:
                break
        if self._stopping:
            raise _StopDuringStart

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
        """The ordered stop; also after a failed or interrupted start (whatever was started)."""
        self._notifier.stopping()
        if self.watcher is not None:
            self.watcher.stop()
        if self.periodic is not None:
            self.periodic.stop()
        in_flight = 0
        if self.executor is not None:
            self._drain()
            in_flight = len(self.flow.inflight)
            self.executor.shutdown(wait=not in_flight)
        if self.audit is not None and self.journal is not None:
            reason = None if self._is_ready or self._stopping else "start_failed"
            self.audit.record(
                DaemonStopped(pid=os.getpid(), interrupted=in_flight or None, reason=reason)
            )
            # After the last line, so that the journal's head is the log's end: cutting off
            # even daemon.stopped is then found by `audit verify`.
            self._record_heartbeat(stopped=True)
        if self.audit is not None:
            self.audit.close()
        if self.journal is not None:
            self.journal.close()
        self.metrics.close()
        self._notifier.close()
        log.info("daemon.stopped", interrupted=in_flight)

    def _drain(self) -> None:
        """Finish in-flight batches, up to the graceful timeout (or a second SIGTERM)."""
        if not self.flow.inflight:
            return
        assert self.audit is not None
        self.audit.record(DaemonDraining(in_flight=len(self.flow.inflight)))
        self.audit.sync()
        deadline = time.monotonic() + self.settings.service.graceful_timeout_s
        while self.flow.inflight and not self._stop_now:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                break
            with contextlib.suppress(queue.Empty):
                self._handle(self._messages.get(timeout=min(remaining, 1.0)), draining=True)
        if self.flow.inflight:
            log.warning("daemon.drain_timeout", in_flight=len(self.flow.inflight))
            # Running tasks cannot be cancelled: shutdown stops their workers, and the next
            # start re-runs their batches (they are still "running" in the journal).

    def _is_finished(self) -> bool:
        if self._stopping:
            return True
        if not self.once:
            return False
        return self.intake.pending == 0 and not self.batcher.open_batches() and self.flow.is_idle

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

    def _handle(self, message: Message, *, draining: bool = False) -> None:
        match message:
            case PathSeen(pipeline=pipeline, path=path, is_writing=is_writing):
                if not draining:
                    self.intake.offer(pipeline, path, is_writing=is_writing)
            case BatchDone(batch_id=batch_id, future=future):
                self.flow.on_done(batch_id, future)
            case SignalReceived(signum=signum):
                self._handle_signal(signum)
            case Tick():
                self._last_tick = time.monotonic()
            case Rescan():
                if not draining and (found := self.intake.scan()):
                    log.info("intake.rescan_found", files=found)
            case Heartbeat():
                self._heartbeat()
            case _:
                assert_never(message)

    def _handle_signal(self, signum: int) -> None:
        if signum == signal.SIGHUP:
            if self._is_ready:
                self._reload()
            else:
                self._reload_pending = True
        elif self._stopping:
            self._stop_now = True
            log.warning("daemon.stop_now")
        else:
            self._stopping = True
            log.info("daemon.stopping", signal=signal.Signals(signum).name)

    def _step(self) -> None:
        if self._stopping:
            return
        assert self.audit is not None
        now = time.time()
        sealed: list[Sealed] = []
        if not self.gate.paused:
            for incoming in self.intake.take_settled():
                self.progress.files_taken += 1
                sealed += self._admit(incoming, now)
        sealed += self.batcher.seal_due(now)
        if self.once and self.intake.pending == 0:
            sealed += self.batcher.seal_all(now)
        for s in sealed:
            self.flow.seal(s)
        self.flow.release_delayed()
        if self.gate.paused != Reason.AUDIT_UNWRITABLE:
            # Nothing is published while its audit line could not be written.
            self.flow.dispatch()
        self.audit.sync()
        if self.audit.failing_since is not None:
            self.gate.pause(Reason.AUDIT_UNWRITABLE)
        self.metrics.set_queue_depth(Counter(t.batch.priority for t in self.dispatcher.waiting))
        self.metrics.set_in_flight(len(self.flow.inflight))

    def _admit(self, incoming: IncomingFile, now: float) -> list[Sealed]:
        pipeline = self._pipelines().get(incoming.pipeline)
        if pipeline is None:
            return []
        if pipeline.duplicates == "skip" and self._is_duplicate(incoming):
            return []
        return self.batcher.add(incoming, now)

    def _is_duplicate(self, incoming: IncomingFile) -> bool:
        """Content this pipeline already published: recorded as a duplicate, not batched."""
        assert self.journal is not None and self.audit is not None
        earlier = self.journal.publisher_of(incoming.pipeline, incoming.sha256)
        if earlier is None:
            return False
        self.journal.mark_duplicates([(incoming.file_id, earlier)])
        self.audit.record(
            FileDuplicate(
                pipeline=incoming.pipeline,
                file_id=incoming.file_id,
                sha256=incoming.sha256,
                batch_id=earlier,
            )
        )
        self.disposal.dispose()
        return True

    def _on_done(self, batch_id: str, future: Future[BatchResult]) -> None:
        """Executor thread: hand the outcome to the main loop."""
        self._messages.put(BatchDone(batch_id, future))

    # -- heartbeat, reload ----------------------------------------------------------------

    def _heartbeat_s(self) -> float:
        interval = self._notifier.watchdog_interval_s
        return min(HEARTBEAT_S, interval) if interval else HEARTBEAT_S

    def _is_healthy(self) -> bool:
        """Watches set, scheduler ticking: otherwise stop pinging systemd's watchdog."""
        late_s = max(10.0, 20 * self.settings.service.tick_s)
        is_tick_late = time.monotonic() - self._last_tick > late_s
        is_watching = self.once or (self.watcher is not None and self.watcher.is_alive())
        is_scheduling = self.periodic is None or self.periodic.is_alive()
        return is_watching and is_scheduling and not is_tick_late

    def _heartbeat(self) -> None:
        assert self.executor is not None and self.audit is not None
        self.flow.reclaim_lost()
        if self.gate.paused == Reason.AUDIT_UNWRITABLE:
            self._retry_audit()
        if not self.once and self.watcher is not None and not self.watcher.is_alive():
            log.error("watcher.dead_restarting")
            self.watcher.restart(self._inbox_folders())
            self.intake.scan()
        healthy = self._is_healthy()
        # A paused intake or an unreachable cluster is degraded, not hung: keep feeding the
        # watchdog, but let `status` say so.
        self._record_heartbeat(
            stopped=False, healthy=healthy and self.executor.is_healthy() and not self.gate.paused
        )
        if healthy:
            self._notifier.watchdog()
        self._notifier.status(
            f"{self.intake.pending} settling, {len(self.dispatcher)} waiting, "
            f"{len(self.flow.inflight)} in flight, {self.progress.published} published"
        )

    def _retry_audit(self) -> None:
        """The audit disk refused a line: once it writes again, rebuild what was lost."""
        assert self.audit is not None and self.journal is not None
        since = self.audit.recover()
        if since is None:
            return
        paths = self.settings.paths
        rebuilt = reconcile(self.journal, self.audit, paths.audit, since - RECONCILE_SLACK_S)
        log.info("audit.recovered", lines_rebuilt=rebuilt)
        self.gate.resume()

    def _record_heartbeat(self, *, stopped: bool, healthy: bool = True) -> None:
        assert self.audit is not None and self.journal is not None
        # The journal's head must never be ahead of what is durable in the log (AuditLog.head).
        self.audit.sync()
        is_durable = self.audit.failing_since is None
        health = Health(
            heartbeat=None if stopped else time.time(),
            pid=os.getpid(),
            healthy=healthy,
            heartbeat_s=self._heartbeat_s(),
            paused=getattr(getattr(self, "gate", None), "paused", None),
            audit_head=self.audit.head if is_durable else None,
            audit_head_at=time.time() if is_durable else None,
        )
        write_health(self.journal, health)

    def _reload(self) -> None:
        assert self.audit is not None and self.executor is not None
        self._notifier.reloading()
        try:
            settings = _reloaded_settings(self.settings)
            name_key = _name_key(settings)
        except MedbatchError as exc:
            log.error("config.rejected", error=str(exc))
            self.audit.record(ConfigRejected(reason=str(exc)))
            self._notifier.ready()
            return
        kept = {p.name for p in settings.pipeline}
        self.flow.retired.update((p.name, p) for p in self.settings.pipeline if p.name not in kept)
        self.settings = self.flow.settings = settings
        self.audit.set_hashed_pipelines(self._hashed_pipelines(), name_key)
        self.intake.reconfigure(settings)
        self.batcher.reconfigure(self._pipelines())
        workers, service = settings.workers, settings.service
        self.dispatcher.reconfigure(workers.count, workers.memory_budget, settings.dispatch.aging_s)
        self.executor.reconfigure(workers.count, self._kinds())
        if self.watcher is not None and not self.once:
            self.watcher.restart(self._inbox_folders())
        if self.periodic is not None:
            self.periodic.reschedule(service.tick_s, service.rescan_s, self._heartbeat_s())
        self.intake.scan()
        self.audit.record(ConfigReloaded(pipelines=len(settings.pipeline), workers=workers.count))
        log.info("config.reloaded", pipelines=len(settings.pipeline), workers=workers.count)
        self._notifier.ready()

    # -- helpers --------------------------------------------------------------------------

    def _pipelines(self) -> dict[str, Pipeline]:
        return {p.name: p for p in self.settings.pipeline}

    def _hashed_pipelines(self) -> frozenset[str]:
        return frozenset(p.name for p in self.settings.pipeline if p.hash_names)

    def _kinds(self) -> list[str]:
        return [p.kind for p in self.settings.pipeline]

    def _inbox_folders(self) -> dict[str, Path]:
        return {p.name: self.settings.paths.inbox / p.name for p in self.settings.pipeline}


def _reloaded_settings(current: Settings) -> Settings:
    path = current.config_path
    if path is None:
        raise ConfigError("config", "no config file to reload")
    settings = load_settings(path)
    if settings.paths != current.paths:
        raise ConfigError("paths", "paths cannot change on reload; restart the service")
    return settings


def _name_key(settings: Settings) -> bytes | None:
    """The audit name key, created on first use (a pipeline with hash_names = true)."""
    if not any(p.hash_names for p in settings.pipeline):
        return None
    return load_name_key(settings.paths.state)

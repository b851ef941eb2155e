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
from typing import assert_never

import structlog

from daemon import __version__
from daemon.audit import TolerantAuditLog, load_chain_key
from daemon.audit.events import (
    AuditEvent,
    ConfigReloaded,
    DaemonDraining,
    DaemonStarted,
    DaemonStopped,
)
from daemon.batch_flow import BatchFlow
from daemon.batcher import Sealed
from daemon.config import Settings
from daemon.console import OnceConsole
from daemon.executors import Executor, make_executor
from daemon.heartbeat import HeartbeatMonitor
from daemon.journal import Journal
from daemon.messages import (
    Archived,
    BatchDone,
    Claimed,
    Heartbeat,
    Message,
    MessageQueue,
    PathSeen,
    Rescan,
    SignalReceived,
    Tick,
)
from daemon.metrics import Metrics
from daemon.models import Reason
from daemon.notify import Notifier
from daemon.outcome_listeners import Progress
from daemon.periodic import Periodic
from daemon.recovery import Recovery
from daemon.reload import name_key_for, reloaded_settings
from daemon.requeue import Requeues
from daemon.retention import Pruner, Retention
from daemon.signals import SignalHandlers
from daemon.startup import by_name, hashed_pipelines, inbox_folders, kinds, prepare_folders
from daemon.watcher import InboxWatcher
from daemon.web.server import StatusServer
from daemon.wiring import wire

log = structlog.get_logger()


def _records(settings: Settings, metrics: Metrics, once: bool) -> tuple[Journal, TolerantAuditLog]:
    journal = Journal(settings.paths.journal)
    audit = TolerantAuditLog(settings.paths.audit, chain_key=load_chain_key(settings.paths.state))
    audit.set_barrier(journal.sync)  # the journal's transitions are durable before their lines
    audit.set_hashed_pipelines(hashed_pipelines(settings), name_key_for(settings))
    audit.add_listener(metrics.on_audit)
    audit.record(DaemonStarted(pid=os.getpid(), version=__version__, once=once or None))
    return journal, audit


def _recover_rollups(flow: BatchFlow, journal: Journal) -> None:
    """A crash between a publish and its rollup merge: the staged shares are merged now."""
    if flow.rollups is not None:
        flow.rollups.recover(lambda batch_id: getattr(journal.batch(batch_id), "state", None))


def _log_starting(settings: Settings, once: bool) -> None:
    log.info(
        "daemon.starting",
        version=__version__,
        config=str(settings.config_path),
        pipelines=[p.name for p in settings.pipeline],
        workers=settings.workers.count,
        executor=settings.workers.executor,
        once=once,
    )


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
        self.status_server: StatusServer | None = None
        self.progress = Progress()
        self._stopping = self._stop_now = self._is_ready = self._reload_pending = False
        self.monitor: HeartbeatMonitor | None = None
        self.journal: Journal | None = None
        self.audit: TolerantAuditLog | None = None
        self.executor: Executor | None = None
        self.watcher: InboxWatcher | None = None
        self.periodic: Periodic | None = None

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
                unfinished, left = self.journal.unfinished_count(), self.intake.left_in_inbox
        finally:
            try:
                self._stop()
            finally:
                self._signals.restore()
        if console is not None:
            console.summary(unfinished, left)
        return 1 if unfinished or left else 0

    def _start(self) -> None:
        _log_starting(self.settings, self.once)
        prepare_folders(self.settings)
        # Even a start stopped at once leaves its daemon.started / daemon.stopped pair.
        self._open_records()
        assert self.journal is not None and self.audit is not None
        parts = wire(self.settings, self.journal, self.audit, self.metrics, self.progress,
                     self._notifier, lambda: by_name(self.settings),
                     self._messages.put)  # fmt: skip
        self.intake, self.batcher, self.dispatcher, self.gate = parts[:4]
        self.disposal, self.flow, self.admission = parts[4:]
        self._checkpoint()
        Recovery(self.settings, self.journal, self.audit, self.intake, self.batcher, self.flow,
                 self.disposal).run()  # fmt: skip
        _recover_rollups(self.flow, self.journal)
        self._checkpoint()
        self.executor = make_executor(self.settings, kinds(self.settings),
                                      lambda b, f: self._messages.put(BatchDone(b, f)))  # fmt: skip
        self.flow.executor = self.executor
        self.executor.start()
        self._checkpoint()
        if self.settings.service.metrics_address:
            self.status_server = StatusServer(self.settings, self.metrics)
            self.status_server.start(self.settings.service.metrics_address)
        backlog = self._start_watching()
        self._heartbeat()
        self.audit.sync()
        self._is_ready = True
        log.info("daemon.ready", pipelines=len(self.settings.pipeline), backlog=backlog,
                 workers=self.settings.workers.count)  # fmt: skip
        self._notifier.ready()
        if self._reload_pending:
            self._reload()

    def _open_records(self) -> None:
        """The journal, then the audit log (its first line: daemon.started)."""
        self.journal, self.audit = journal, audit = _records(self.settings, self.metrics, self.once)
        self.monitor = HeartbeatMonitor(self._notifier, audit, journal)
        self.pruner = Pruner(Retention(lambda: self.settings, journal), audit.record)
        self.requeues = Requeues(self.settings.paths.state, journal, audit.record)

    def _start_watching(self) -> int:
        self.watcher = InboxWatcher(self._messages)
        if not self.once:
            self.watcher.start(inbox_folders(self.settings))
        self._checkpoint()
        if not (found := self.intake.scan()) and not self.once:
            self.intake.claimer.start()  # idle: its child starts now, not with the first drops
        self.periodic = Periodic(self._messages)
        service = self.settings.service
        assert self.monitor is not None
        self.periodic.start(service.tick_s, service.rescan_s, self.monitor.interval_s)
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
            self.disposal.close()  # the archiver's renames finish and are marked
            self.intake.close()  # claims made are journaled; the next start batches them
        if self.audit is not None and self.journal is not None:
            reason = None if self._is_ready or self._stopping else Reason.START_FAILED
            self.audit.record(
                DaemonStopped(pid=os.getpid(), interrupted=in_flight or None, reason=reason)
            )
            # After the last line, so that the journal's head is the log's end: cutting off
            # even daemon.stopped is then found by `audit verify`.
            assert self.monitor is not None
            self.monitor.record(stopped=True)
        if self.audit is not None:
            self.audit.close()
        if self.journal is not None:
            self.journal.close()
        if self.status_server is not None:
            self.status_server.close()
        self._notifier.close()
        log.info(AuditEvent.DAEMON_STOPPED, interrupted=in_flight)

    def _drain(self) -> None:
        """Finish in-flight batches, up to the graceful timeout (or a second SIGTERM)."""
        if not self.flow.inflight:
            return
        assert self.audit is not None
        self.audit.record(DaemonDraining(in_flight=len(self.flow.inflight)))
        self.audit.sync()
        deadline = time.monotonic() + self.settings.service.graceful_timeout_s
        while self.flow.inflight and not self._stop_now and time.monotonic() < deadline:
            with contextlib.suppress(queue.Empty):
                wait_s = min(deadline - time.monotonic(), 1.0)
                self._handle(self._messages.get(timeout=max(wait_s, 0.0)), draining=True)
        if self.flow.inflight:
            # Running tasks cannot be cancelled: shutdown stops their workers, and the next
            # start re-runs their batches (they are still "running" in the journal).
            log.warning("daemon.drain_timeout", in_flight=len(self.flow.inflight))

    def _is_finished(self) -> bool:
        if self._stopping or not self.once:
            return self._stopping
        return self.intake.pending == 0 and not self.batcher.open_batches() and self.flow.is_idle

    def _wait_and_handle(self) -> None:
        due = self.intake.next_due(is_paused=bool(self.gate.paused))
        timeout = (0.2 if self.once else None) if due is None else max(0.0, due - time.monotonic())
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
            case Archived():
                self.disposal.collect()
            case Claimed():
                pass  # the next step takes them
            case SignalReceived(signum=signum):
                self._handle_signal(signum)
            case Tick():
                if self.monitor is not None:
                    self.monitor.on_tick()
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
        can_publish = self.gate.paused != Reason.AUDIT_UNWRITABLE
        if can_publish:
            self.flow.dispatch()  # a slot freed since the last step gets its batch before a claim
        taken = self.intake.step(is_paused=bool(self.gate.paused))
        self.progress.files_taken += len(taken)
        sealed += self.admission.admit(taken, now)
        sealed += self.batcher.seal_due(now)
        if self.once and self.intake.pending == 0:
            sealed += self.batcher.seal_all(now)
        for s in sealed:
            self.flow.seal(s)
        self.flow.release_delayed()
        if can_publish:  # nothing is published while its audit line could not be written
            self.flow.dispatch()
        self.audit.sync_due()
        if self.audit.failing_since is not None:
            self.gate.pause(Reason.AUDIT_UNWRITABLE)
        self.metrics.set_queue_depth(Counter(t.batch.priority for t in self.dispatcher.waiting))
        self.metrics.set_in_flight(len(self.flow.inflight))

    def _heartbeat(self) -> None:
        assert self.executor is not None and self.monitor is not None
        self.flow.reclaim_lost()
        if self.gate.paused == Reason.AUDIT_UNWRITABLE:
            self.monitor.retry_audit(self.gate)
        if not self.once and self.watcher is not None and not self.watcher.is_alive():
            log.error("watcher.dead_restarting")
            self.watcher.restart(inbox_folders(self.settings))
            self.intake.scan()
        self.requeues.link()
        self.disposal.retry_due()
        # Retention's moment: nothing settling, waiting or in flight, intake not paused.
        idle = not (
            self.flow.inflight or self.dispatcher or self.intake.pending or self.gate.paused
        )
        if not self.once:
            self.pruner.maybe_step(self.settings, is_idle=idle)
        # Watches set, scheduler ticking: otherwise stop pinging systemd's watchdog. A paused
        # intake or an unreachable cluster is degraded, not hung: `status` says so.
        is_watching = self.once or (self.watcher is not None and self.watcher.is_alive())
        is_scheduling = self.periodic is None or self.periodic.is_alive()
        self.monitor.beat(
            is_alive=is_watching
            and is_scheduling
            and self.monitor.is_ticking(self.settings.service.tick_s),
            is_healthy=self.executor.is_healthy(),
            is_watching=is_watching,
            paused=self.gate.paused,
            status=f"{self.intake.pending} settling, {len(self.dispatcher)} waiting, "
            f"{len(self.flow.inflight)} in flight, {self.progress.published} published",
        )

    def _reload(self) -> None:
        assert self.audit is not None and self.executor is not None
        self._notifier.reloading()
        loaded = reloaded_settings(self.settings, self.audit)
        if loaded is None:
            self._notifier.ready()
            return
        settings, name_key = loaded
        self.flow.reconfigure(settings)
        self.settings = settings
        self.audit.set_hashed_pipelines(hashed_pipelines(settings), name_key)
        self.intake.reconfigure(settings)
        self.batcher.reconfigure(by_name(settings))
        workers, service = settings.workers, settings.service
        self.dispatcher.reconfigure(workers.count, workers.memory_budget, settings.dispatch.aging_s)
        self.executor.reconfigure(workers.count, kinds(settings))
        if self.watcher is not None and not self.once:
            self.watcher.restart(inbox_folders(self.settings))
        if self.periodic is not None:
            assert self.monitor is not None
            self.periodic.reschedule(service.tick_s, service.rescan_s, self.monitor.interval_s)
        self.intake.scan()
        reloaded = ConfigReloaded(pipelines=len(settings.pipeline), workers=workers.count)
        self.audit.record(reloaded)
        log.info(AuditEvent.CONFIG_RELOADED, **reloaded.payload())
        self._notifier.ready()

"""The heartbeat: liveness recorded in the journal (for `status`), systemd's watchdog fed, and
an audit log that refused writes retried. Main loop, on each Heartbeat message.
"""

from __future__ import annotations

import os
import time

import structlog

from daemon.audit import TolerantAuditLog
from daemon.audit.events import AuditEvent
from daemon.audit.reconcile import RECONCILE_SLACK_S, reconcile
from daemon.health import HEARTBEAT_S, Health, write_health
from daemon.journal import Journal
from daemon.notify import Notifier
from daemon.outcome_listeners import IntakeGate

log = structlog.get_logger()

# The audit chain's head goes to journald this often, so a copy exists outside the audit folder.
AUDIT_HEAD_LOG_S = 300.0


class HeartbeatMonitor:
    def __init__(self, notifier: Notifier, audit: TolerantAuditLog, journal: Journal) -> None:
        self._notifier = notifier
        self._audit = audit
        self._journal = journal
        self.last_tick = time.monotonic()
        self._head_logged_at: float | None = None

    @property
    def interval_s(self) -> float:
        """Every HEARTBEAT_S, or more often when systemd's WatchdogSec asks for it."""
        interval = self._notifier.watchdog_interval_s
        return min(HEARTBEAT_S, interval) if interval else HEARTBEAT_S

    def on_tick(self) -> None:
        self.last_tick = time.monotonic()

    def is_ticking(self, tick_s: float) -> bool:
        """The scheduler's ticks still arrive (a stuck loop or a dead scheduler stops them)."""
        return time.monotonic() - self.last_tick <= max(10.0, 20 * tick_s)

    def beat(
        self,
        *,
        is_alive: bool,
        is_healthy: bool,
        is_watching: bool,
        paused: str | None,
        status: str,
    ) -> None:
        """Record it; feed the watchdog only when alive (degraded is not hung)."""
        self.record(
            stopped=False,
            healthy=is_alive and is_healthy and not paused,
            paused=paused,
            workers_ok=is_healthy,
            watches_ok=is_watching,
        )
        if is_alive:
            self._notifier.watchdog()
        self._notifier.status(status)

    def record(
        self,
        *,
        stopped: bool,
        healthy: bool = True,
        paused: str | None = None,
        workers_ok: bool = True,
        watches_ok: bool = True,
    ) -> None:
        # The journal's head must never be ahead of what is durable in the log (AuditLog.head).
        self._audit.sync()
        is_durable = self._audit.failing_since is None
        health = Health(
            heartbeat=None if stopped else time.time(),
            pid=os.getpid(),
            healthy=healthy,
            heartbeat_s=self.interval_s,
            paused=paused,
            audit_head=self._audit.head if is_durable else None,
            audit_head_at=time.time() if is_durable else None,
            workers_ok=workers_ok,
            watches_ok=watches_ok,
        )
        write_health(self._journal, health)
        if is_durable:
            self._log_head(force=stopped)

    def _log_head(self, *, force: bool) -> None:
        now = time.monotonic()
        last = self._head_logged_at
        if force or last is None or now - last >= AUDIT_HEAD_LOG_S:
            seq, digest = self._audit.head
            log.info("audit.head", seq=seq, hash=digest)
            self._head_logged_at = now

    def retry_audit(self, gate: IntakeGate) -> None:
        """The audit disk refused a line: once it writes again, rebuild what was lost."""
        since = self._audit.recover()
        if since is None:
            return
        folder = self._audit.folder
        rebuilt = reconcile(self._journal, self._audit, folder, since - RECONCILE_SLACK_S)
        log.info(AuditEvent.AUDIT_RECOVERED, lines_rebuilt=rebuilt)
        gate.resume()

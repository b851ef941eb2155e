"""The listeners that react to batch outcomes: audit trail, metrics, intake gate, logs, notify,
progress and disposal. Main loop only; the service lists them in order.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import structlog

from daemon.audit import AuditLog
from daemon.audit.events import (
    AuditEvent,
    BatchFailed,
    BatchPublished,
    BatchRetried,
    BatchSealed,
    BatchSplit,
    BatchStarted,
    FileQuarantined,
    IntakePaused,
    IntakeResumed,
    provenance_fields,
)
from daemon.disposal import Disposal
from daemon.health import write_paused
from daemon.journal import Journal
from daemon.metrics import Metrics
from daemon.models import DISK_REASONS, Batch, Reason
from daemon.notify import Notifier
from daemon.outcomes import (
    Committed,
    GaveUp,
    Listener,
    Listeners,
    Outcome,
    Retrying,
    Sealed,
    SplitUp,
    Started,
)
from daemon.rollup import Rollups

log = structlog.get_logger()
_KILLS_ITS_WORKER = frozenset({Reason.WORKER_CRASH, Reason.TIMEOUT})


class AuditTrail(Listener):
    """One audit line per transition, right after its journal commit."""

    def __init__(self, audit: AuditLog) -> None:
        self._audit = audit

    def on_outcome(self, outcome: Outcome) -> None:
        match outcome:
            case Sealed(batch=b):
                self._audit.record(
                    BatchSealed(
                        pipeline=b.pipeline,
                        batch_id=b.batch_id,
                        files=len(b.files),
                        bytes=b.n_bytes,
                        priority=b.priority,
                        group=b.group,
                    )
                )
            case Started(batch=b):
                self._audit.record(
                    BatchStarted(pipeline=b.pipeline, batch_id=b.batch_id, attempt=b.attempt)
                )
            case Committed():
                self._committed(outcome)
            case Retrying(batch=b):
                self._audit.record(
                    BatchRetried(
                        pipeline=b.pipeline,
                        batch_id=b.batch_id,
                        attempt=b.attempt,
                        reason=outcome.reason,
                        delay_s=outcome.delay_s,
                    )
                )
            case SplitUp(batch=b, children=children, reason=reason):
                into = tuple(c.batch_id for c in children)
                self._audit.record(
                    BatchSplit(pipeline=b.pipeline, batch_id=b.batch_id, reason=reason, into=into)
                )
            case GaveUp(batch=b, reason=reason):
                self._failed(b, reason)
                self._quarantined(b, {f.file_id: reason for f in b.files})

    def _committed(self, outcome: Committed) -> None:
        b, result = outcome.batch, outcome.result
        if result.is_published:
            self._audit.record(
                BatchPublished(
                    pipeline=b.pipeline,
                    batch_id=b.batch_id,
                    files=len(result.facts),
                    quarantined=len(result.quarantined),
                    folder=str(result.folder),
                    **provenance_fields(result.provenance),
                )
            )
        else:
            self._failed(b, Reason.EVERY_INPUT_QUARANTINED)
        self._quarantined(b, {i: reason for i, (reason, _) in result.quarantined.items()})

    def _failed(self, b: Batch, reason: str) -> None:
        self._audit.record(
            BatchFailed(pipeline=b.pipeline, batch_id=b.batch_id, reason=reason, attempts=b.attempt)
        )

    def _quarantined(self, b: Batch, reasons: dict[int, str]) -> None:
        for f in b.files:
            if f.file_id in reasons:
                event = FileQuarantined(
                    pipeline=b.pipeline,
                    file=f.name,
                    file_id=f.file_id,
                    reason=reasons[f.file_id],
                    sha256=f.sha256 or None,
                    batch_id=b.batch_id,
                )
                self._audit.record(event)
        # No sync here: these lines are rebuilt from the journal if a power cut takes them
        # (REBUILT_EVENTS), so the step's `sync_due` groups them with the rest.


class MetricsListener(Listener):
    """Run times, drop-to-publish latencies and worker restarts (counters follow the audit)."""

    def __init__(self, metrics: Metrics) -> None:
        self._metrics = metrics

    def on_outcome(self, outcome: Outcome) -> None:
        match outcome:
            case Committed(batch=b, run_s=run_s, waits_s=waits):
                self._metrics.batch_finished(b.pipeline, run_s, waits)
            case (
                Retrying(batch=b, run_s=float() as run_s, reason=reason)
                | SplitUp(batch=b, run_s=float() as run_s, reason=reason)
                | GaveUp(batch=b, run_s=float() as run_s, reason=reason)
            ):
                self._metrics.batch_finished(b.pipeline, run_s)
                if reason in _KILLS_ITS_WORKER:
                    self._metrics.worker_restarted()
            case _:
                pass


class IntakeGate(Listener):
    """Paused intake: a failing disk stops file taking until a batch publishes again."""

    def __init__(self, audit: AuditLog, journal: Journal) -> None:
        self._audit = audit
        self._journal = journal
        self.paused: str | None = None

    def on_outcome(self, outcome: Outcome) -> None:
        match outcome:
            case Retrying(should_pause=True, reason=reason):
                self.pause(reason)
            case Committed(result=result) if result.is_published and self.paused in DISK_REASONS:
                self.resume()
            case _:
                pass

    def pause(self, reason: str) -> None:
        if self.paused == reason:
            return
        self.paused = reason
        log.error(AuditEvent.INTAKE_PAUSED, reason=reason)
        self._audit.record(IntakePaused(reason=reason))
        write_paused(self._journal, reason)

    def resume(self) -> None:
        log.info(AuditEvent.INTAKE_RESUMED, after=self.paused)
        self._audit.record(IntakeResumed(after=self.paused))
        self.paused = None
        write_paused(self._journal, None)


class OperationalLog(Listener):
    """One INFO line per batch sealed, published, retried, split or failed: ids, counts, bytes,
    durations and reason codes, never a file name."""

    def on_outcome(self, outcome: Outcome) -> None:
        match outcome:
            case Sealed(batch=b):
                log.info(
                    AuditEvent.BATCH_SEALED,
                    pipeline=b.pipeline,
                    batch_id=b.batch_id,
                    files=len(b.files),
                    bytes=b.n_bytes,
                    priority=b.priority,
                )
            case Committed(batch=b, result=r, run_s=run_s) if r.is_published:
                log.info(
                    AuditEvent.BATCH_PUBLISHED,
                    pipeline=b.pipeline,
                    batch_id=b.batch_id,
                    files=len(r.facts),
                    quarantined=len(r.quarantined),
                    attempt=b.attempt,
                    run_s=round(run_s, 3),
                )
            case Committed(batch=b, result=r):
                reasons = sorted({reason for reason, _ in r.quarantined.values()})
                log.warning(
                    "batch.quarantined", pipeline=b.pipeline, batch_id=b.batch_id,
                    files=len(r.quarantined), reasons=reasons,
                )  # fmt: skip
            case Retrying(batch=b, reason=reason, delay_s=delay_s, is_counted=is_counted):
                log.info(
                    AuditEvent.BATCH_RETRIED, pipeline=b.pipeline, batch_id=b.batch_id,
                    attempt=b.attempt, reason=reason, delay_s=delay_s, counted=is_counted,
                )  # fmt: skip
            case SplitUp(batch=b, children=children, reason=reason):
                log.warning(
                    AuditEvent.BATCH_SPLIT, pipeline=b.pipeline, batch_id=b.batch_id, reason=reason,
                    into=[c.batch_id for c in children],
                )  # fmt: skip
            case GaveUp(batch=b, reason=reason):
                log.error(
                    AuditEvent.BATCH_FAILED, pipeline=b.pipeline, batch_id=b.batch_id,
                    reason=reason, files=len(b.files), attempts=b.attempt,
                )  # fmt: skip
            case _:
                pass


@dataclass
class Progress(Listener):
    """Counts for `run --once`'s summary and sd_notify's STATUS line."""

    files_taken: int = 0
    published: int = 0
    quarantined: int = 0
    started: float = field(default_factory=time.monotonic)

    def on_outcome(self, outcome: Outcome) -> None:
        match outcome:
            case Committed(result=r):
                self.published += int(r.is_published)
                self.quarantined += len(r.quarantined)
            case GaveUp(batch=b):
                self.quarantined += len(b.files)
            case _:
                pass


class RollupListener(Listener):
    """After a publish, the batch's staged statistics join its pipeline's rollup table (with
    any share an earlier failed write left staged)."""

    def __init__(self, rollups: Rollups, journal: Journal) -> None:
        self._rollups = rollups
        self._journal = journal

    def on_outcome(self, outcome: Outcome) -> None:
        match outcome:
            case Committed(batch=b, result=r) if r.is_published and r.rollup is not None:
                self._rollups.merge_staged(b.pipeline, self._state_of)
            case _:
                pass

    def _state_of(self, batch_id: str) -> str | None:
        row = self._journal.batch(batch_id)
        return None if row is None else row.state


class DisposalListener(Listener):
    """Last: move the finished inputs out of the spool once their lines are written."""

    def __init__(self, disposal: Disposal) -> None:
        self._disposal = disposal

    def on_outcome(self, outcome: Outcome) -> None:
        if isinstance(outcome, Committed | GaveUp):
            self._disposal.dispose(outcome.batch.batch_id)


class NotifyListener(Listener):
    """sd_notify STATUS= after each finished batch (systemctl status shows it)."""

    def __init__(self, notifier: Notifier, progress: Progress) -> None:
        self._notifier = notifier
        self._progress = progress

    def on_outcome(self, outcome: Outcome) -> None:
        if isinstance(outcome, Committed | GaveUp):
            p = self._progress
            self._notifier.status(f"{p.published} batches published, {p.quarantined} quarantined")


def standard_listeners(
    audit: AuditLog,
    metrics: Metrics,
    gate: IntakeGate,
    progress: Progress,
    notifier: Notifier,
    disposal: Disposal,
    rollups: Rollups | None = None,
    journal: Journal | None = None,
) -> Listeners:
    """The service's list, in order: the audit line first (it follows the journal commit),
    disposal last (inputs leave the spool once everything about them is written)."""
    return Listeners(
        [
            AuditTrail(audit),
            MetricsListener(metrics),
            gate,
            OperationalLog(),
            progress,
            NotifyListener(notifier, progress),
            *([RollupListener(rollups, journal)] if rollups and journal else []),
            DisposalListener(disposal),
        ]
    )

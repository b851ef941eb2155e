"""The audit vocabulary: one frozen dataclass per event, its fields the line's payload.

The live writer, the reconciler (which rebuilds lines from the journal) and the metrics all use
these types, so a line written live and the same line rebuilt cannot drift apart.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, fields
from typing import ClassVar

from daemon.models import Provenance


class AuditEvent(enum.StrEnum):
    DAEMON_STARTED = "daemon.started"
    DAEMON_STOPPED = "daemon.stopped"
    DAEMON_RECOVERED = "daemon.recovered"
    DAEMON_DRAINING = "daemon.draining"
    FILE_RECEIVED = "file.received"
    FILE_REJECTED = "file.rejected"
    FILE_QUARANTINED = "file.quarantined"
    FILE_DUPLICATE = "file.duplicate"
    BATCH_SEALED = "batch.sealed"
    BATCH_STARTED = "batch.started"
    BATCH_PUBLISHED = "batch.published"
    BATCH_FAILED = "batch.failed"
    BATCH_RETRIED = "batch.retried"
    BATCH_SPLIT = "batch.split"
    CONFIG_RELOADED = "config.reloaded"
    CONFIG_REJECTED = "config.rejected"
    INTAKE_PAUSED = "intake.paused"
    INTAKE_RESUMED = "intake.resumed"
    AUDIT_RECOVERED = "audit.recovered"
    RETENTION_PRUNED = "retention.pruned"
    FILE_REQUEUED = "file.requeued"


# The events `reconcile` rebuilds from the journal when a crash or a power cut lost their lines:
# the only ones whose fsync may wait (AuditLog.sync_due). `batch.started`: the journal keeps a
# batch's last attempt (its number and start), so that attempt's line is rebuilt.
REBUILT_EVENTS = frozenset(
    {
        AuditEvent.FILE_RECEIVED,
        AuditEvent.FILE_QUARANTINED,
        AuditEvent.FILE_DUPLICATE,
        AuditEvent.BATCH_SEALED,
        AuditEvent.BATCH_STARTED,
        AuditEvent.BATCH_PUBLISHED,
        AuditEvent.BATCH_FAILED,
    }
)

_FIELD_NAMES: dict[type, tuple[str, ...]] = {}  # per event class: payload() runs once a line


@dataclass(frozen=True, slots=True, kw_only=True)
class Record:
    """Base of every event: `payload()` is what the line carries besides ts/seq/event/prev/hash
    (None fields are left out)."""

    event: ClassVar[AuditEvent]

    def payload(self) -> dict[str, object]:
        out: dict[str, object] = {}
        names = _FIELD_NAMES.get(type(self))
        if names is None:
            names = _FIELD_NAMES[type(self)] = tuple(f.name for f in fields(self))
        for name in names:
            value = getattr(self, name)
            if value is None:
                continue
            out[name] = list(value) if isinstance(value, tuple) else value
        return out


@dataclass(frozen=True, slots=True, kw_only=True)
class DaemonStarted(Record):
    event = AuditEvent.DAEMON_STARTED
    pid: int
    version: str
    once: bool | None = None


@dataclass(frozen=True, slots=True, kw_only=True)
class DaemonStopped(Record):
    event = AuditEvent.DAEMON_STOPPED
    pid: int
    interrupted: int | None = None
    reason: str | None = None


@dataclass(frozen=True, slots=True, kw_only=True)
class DaemonRecovered(Record):
    event = AuditEvent.DAEMON_RECOVERED
    stale_staging: int = 0
    claims_finished: int = 0
    orphans_adopted: int = 0
    batches_rerun: int = 0
    files_rebatched: int = 0
    audit_lines_rebuilt: int = 0
    files_of_removed_pipelines: int = 0


@dataclass(frozen=True, slots=True, kw_only=True)
class DaemonDraining(Record):
    event = AuditEvent.DAEMON_DRAINING
    in_flight: int


@dataclass(frozen=True, slots=True, kw_only=True)
class FileReceived(Record):
    event = AuditEvent.FILE_RECEIVED
    pipeline: str
    file: str
    sha256: str
    size: int
    file_id: int


@dataclass(frozen=True, slots=True, kw_only=True)
class FileRejected(Record):
    event = AuditEvent.FILE_REJECTED
    pipeline: str
    file: str
    reason: str
    size: int


@dataclass(frozen=True, slots=True, kw_only=True)
class FileQuarantined(Record):
    event = AuditEvent.FILE_QUARANTINED
    pipeline: str
    file: str
    file_id: int
    reason: str
    sha256: str | None = None
    batch_id: str | None = None


@dataclass(frozen=True, slots=True, kw_only=True)
class FileDuplicate(Record):
    event = AuditEvent.FILE_DUPLICATE
    pipeline: str
    file_id: int
    sha256: str
    batch_id: str


@dataclass(frozen=True, slots=True, kw_only=True)
class BatchSealed(Record):
    event = AuditEvent.BATCH_SEALED
    pipeline: str
    batch_id: str
    files: int
    bytes: int
    priority: int
    group: str | None = None  # batch_by pipelines: the series/study as a keyed hash


@dataclass(frozen=True, slots=True, kw_only=True)
class BatchStarted(Record):
    event = AuditEvent.BATCH_STARTED
    pipeline: str
    batch_id: str
    attempt: int


@dataclass(frozen=True, slots=True, kw_only=True)
class BatchPublished(Record):
    """Provenance as hashes and versions (the manifest has the options themselves); absent
    from a line rebuilt for a folder whose manifest has none."""

    event = AuditEvent.BATCH_PUBLISHED
    pipeline: str
    batch_id: str
    files: int
    quarantined: int
    folder: str
    version: str | None = None
    host: str | None = None
    config_sha256: str | None = None
    options_sha256: str | None = None


def provenance_fields(provenance: Provenance | None) -> dict[str, str]:
    """`BatchPublished`'s provenance fields: versions and hashes only, never option values."""
    if provenance is None:
        return {}
    return {
        "version": provenance.version,
        "host": provenance.host,
        "config_sha256": provenance.config_sha256,
        "options_sha256": provenance.options_sha256,
    }


@dataclass(frozen=True, slots=True, kw_only=True)
class BatchFailed(Record):
    event = AuditEvent.BATCH_FAILED
    pipeline: str
    batch_id: str
    reason: str
    attempts: int


@dataclass(frozen=True, slots=True, kw_only=True)
class BatchRetried(Record):
    event = AuditEvent.BATCH_RETRIED
    pipeline: str
    batch_id: str
    attempt: int
    reason: str
    delay_s: float


@dataclass(frozen=True, slots=True, kw_only=True)
class BatchSplit(Record):
    event = AuditEvent.BATCH_SPLIT
    pipeline: str
    batch_id: str
    reason: str
    into: tuple[str, ...]


@dataclass(frozen=True, slots=True, kw_only=True)
class ConfigReloaded(Record):
    event = AuditEvent.CONFIG_RELOADED
    pipelines: int
    workers: int


@dataclass(frozen=True, slots=True, kw_only=True)
class ConfigRejected(Record):
    event = AuditEvent.CONFIG_REJECTED
    reason: str


@dataclass(frozen=True, slots=True, kw_only=True)
class IntakePaused(Record):
    event = AuditEvent.INTAKE_PAUSED
    reason: str


@dataclass(frozen=True, slots=True, kw_only=True)
class IntakeResumed(Record):
    event = AuditEvent.INTAKE_RESUMED
    after: str | None


@dataclass(frozen=True, slots=True, kw_only=True)
class AuditRecovered(Record):
    event = AuditEvent.AUDIT_RECOVERED
    file: str | None = None
    torn_bytes: int | None = None
    reason: str | None = None


@dataclass(frozen=True, slots=True, kw_only=True)
class RetentionPruned(Record):
    """Retention deleted `files` items of one kind (archive, quarantine, journal rows, audit
    days) of `bytes` in all; never a name. Not rebuilt by the reconciler (nothing in the journal
    remembers it)."""

    event = AuditEvent.RETENTION_PRUNED
    kind: str
    files: int
    bytes: int
    pipeline: str | None = None
    checkpoint_seq: int | None = None


@dataclass(frozen=True, slots=True, kw_only=True)
class FileRequeued(Record):
    """A quarantined input went back through its pipeline as a new journal row."""

    event = AuditEvent.FILE_REQUEUED
    pipeline: str
    file_id: int
    new_file_id: int
    reason: str
    sha256: str | None = None
    forced: bool | None = None

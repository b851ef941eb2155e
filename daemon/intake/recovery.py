"""Intake's recovery and quarantine side: orphans in the spool, refused claims (main loop)."""

from __future__ import annotations

import os
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

import structlog

from daemon.audit import AuditLog
from daemon.audit.events import AuditEvent, FileQuarantined
from daemon.config import Pipeline, Settings
from daemon.disposal import published_names, quarantine
from daemon.intake import claim
from daemon.intake.claim import Refusal
from daemon.intake.dicom_group import group_for
from daemon.journal import Journal
from daemon.models import IncomingFile, Reason

log = structlog.get_logger()


@dataclass(frozen=True, slots=True)
class Refused:
    """A claimed entry that turned out not to be what was checked: quarantined as it is."""

    file_id: int
    pipeline: str
    name: str
    spool_name: str
    reason: str


def adopt_orphans(journal: Journal, spool: Path, pipelines: Iterable[str]) -> int:
    """Recovery: spooled files the journal does not know (a journal restored from a backup,
    a write lost with the disk) become claims again, under their spool name since the
    original name is gone: never left behind, never deleted. Half-made copies go."""
    known = journal.spool_names()
    orphans = []
    for pipeline in pipelines:
        folder = spool / pipeline
        for entry in os.scandir(folder) if folder.is_dir() else ():
            if entry.name.startswith(".") and entry.name.endswith(claim.COPY_SUFFIX):
                Path(entry.path).unlink(missing_ok=True)
                continue
            spool_name = f"{pipeline}/{entry.name}"
            if spool_name not in known and not entry.name.startswith("."):
                mtime = entry.stat(follow_symlinks=False).st_mtime
                orphans.append((pipeline, entry.name, spool_name, mtime))
    if orphans:
        journal.begin_claims(orphans)
        log.warning("intake.orphans_adopted", files=len(orphans))
    return len(orphans)


def quarantine_refused(
    refused: list[Refused], settings: Settings, audit: AuditLog, journal: Journal
) -> None:
    """Audit, then move each refused entry to quarantine at once (a rename: still never
    opened). A failed move is left to the supervisor's disposal, which retries."""
    disposed = []
    for r in refused:
        audit.record(
            FileQuarantined(pipeline=r.pipeline, file=r.name, file_id=r.file_id, reason=r.reason)
        )
        log.warning(
            AuditEvent.FILE_QUARANTINED, pipeline=r.pipeline, file_id=r.file_id, reason=r.reason
        )
        pipeline = next((p for p in settings.pipeline if p.name == r.pipeline), None)
        as_name, shown = published_names(settings.paths.state, pipeline, r.name)
        sidecar = {
            "name": shown,
            "pipeline": r.pipeline,
            "reason": r.reason,
            "detail": "refused when claimed (not what was checked, or unreadable); not kept",
            "sha256": "",
            "size": 0,
            "batch_id": None,
            "quarantined_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        }
        target = settings.paths.quarantine / r.pipeline
        try:
            quarantine(settings.paths.spool / r.spool_name, target, as_name, sidecar)
        except FileNotFoundError:
            pass
        except OSError as exc:
            log.error("intake.quarantine_failed", file_id=r.file_id, errno=claim.errno_name(exc))
            continue
        disposed.append(r.file_id)
    if disposed:
        journal.mark_disposed(disposed)


def finish_interrupted_claims(
    journal: Journal,
    settings: Settings,
    pipelines: Mapping[str, Pipeline],
    audit: AuditLog,
    service_uid: int,
    group_key: bytes | None = None,
) -> list[IncomingFile]:
    """Recovery: claims whose journal intent was written but not their outcome."""
    received, dropped, refused, taken = [], [], [], []
    groups: dict[int, str] = {}
    for row in journal.claiming():
        spooled = settings.paths.spool / row.spool_name
        if row.pipeline not in pipelines or not os.path.lexists(spooled):
            dropped.append(row.id)
            continue
        pipeline = pipelines[row.pipeline]
        outcome = claim.take_spooled(spooled, pipeline, service_uid)
        if isinstance(outcome, Refusal):
            if outcome.reason == Reason.VANISHED:
                dropped.append(row.id)
                continue
            refused.append(Refused(row.id, row.pipeline, row.name, row.spool_name, outcome.reason))
            continue
        received.append((row.id, outcome.sha256, outcome.size))
        if group := group_for(pipeline, spooled, group_key):
            groups[row.id] = group
        taken.append(
            IncomingFile(
                row.id,
                row.pipeline,
                row.name,
                spooled,
                outcome.sha256,
                outcome.size,
                row.received_at,
                group=group,
            )
        )
    if received or dropped or refused:
        refusals = [(r.file_id, "", 0, r.reason) for r in refused]
        journal.finish_claims(received, dropped, refusals, groups)
    quarantine_refused(refused, settings, audit, journal)
    return taken

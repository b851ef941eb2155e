"""Rebuild the audit lines that a crash or a full disk kept from being written. Main process.

Every transition is a journal commit first and an audit line right after; a `kill -9` between
the two, or a disk that refuses the line, leaves the journal ahead of the log. The journal is
the truth: each transition recorded since `since` that has no line in the log gets one now,
marked `recovered`, built from the same event types the live writer uses.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from daemon.audit.events import (
    AuditEvent,
    BatchFailed,
    BatchPublished,
    BatchSealed,
    BatchStarted,
    FileDuplicate,
    FileQuarantined,
    FileReceived,
    Record,
    provenance_fields,
)
from daemon.audit.verify import read_lines
from daemon.audit.writer import AuditLog
from daemon.fsutil import utc_day
from daemon.journal_queries import JournalQueries
from daemon.models import BatchState, FileState, Provenance, Reason

_FILE_EVENTS = {AuditEvent.FILE_RECEIVED, AuditEvent.FILE_QUARANTINED, AuditEvent.FILE_DUPLICATE}
Transition = tuple[float, Record]
# Journal times and the moment the audit head was recorded come from one clock; the slack only
# covers float rounding: a line already present is never written twice (reconcile checks).
RECONCILE_SLACK_S = 2.0


def reconcile(journal: JournalQueries, audit: AuditLog, folder: Path, since: float) -> int:
    """Append what is missing; return how many lines. Reads only the log's days from `since`."""
    present = _present(folder, since)
    missing = [(at, ev) for at, ev in transitions(journal, since) if key_of(ev) not in present]
    for _, event in sorted(missing, key=lambda item: item[0]):
        audit.record(event, recovered=True)
    audit.sync()
    return len(missing)


def key_of(event: Record) -> tuple[str, object]:
    """What identifies one transition's line: (event, file id or batch id; with the attempt for
    `batch.started`)."""
    payload = event.payload()
    return _key(event.event.value, payload)


def _key(event: str, fields: dict[str, Any]) -> tuple[str, object]:
    if event == AuditEvent.BATCH_STARTED:
        return event, (fields.get("batch_id"), fields.get("attempt"))
    return event, fields.get("file_id" if event in _FILE_EVENTS else "batch_id")


def _present(folder: Path, since: float) -> set[tuple[str, object]]:
    """(event, file id or batch id) of every line from the day of `since` on."""
    day = utc_day(since)
    found: set[tuple[str, object]] = set()
    for line in read_lines(folder, since_day=day):
        if str(line.get("ts", ""))[:10] < day:
            continue
        found.add(_key(str(line.get("event")), line))
    return found


def transitions(journal: JournalQueries, since: float) -> list[Transition]:
    """(when, event) of each journal transition at or after `since`."""
    out: list[Transition] = []
    for f in journal.files_changed_since(since):
        out += _file_transitions(f, since)
    for b in journal.batches_changed_since(since):
        out += _batch_transitions(b, since)
    return out


def _file_transitions(f: dict[str, Any], since: float) -> list[Transition]:
    out: list[Transition] = []
    pipeline, file_id = f["pipeline"], f["id"]
    if f["received_at"] >= since and f["state"] != FileState.CLAIMING:
        received = FileReceived(
            pipeline=pipeline, file=f["name"], sha256=f["sha256"], size=f["size"], file_id=file_id
        )
        out.append((f["received_at"], received))
    done_at = f["done_at"] or 0
    if f["state"] == FileState.QUARANTINED and done_at >= since:
        quarantined = FileQuarantined(
            pipeline=pipeline,
            file=f["name"],
            file_id=file_id,
            reason=f["reason"],
            sha256=f["sha256"] or None,
            batch_id=f["batch_id"],
        )
        out.append((done_at, quarantined))
    if f["state"] == FileState.DUPLICATE and done_at >= since:
        earlier = str(f["reason"] or "").removeprefix(f"{Reason.DUPLICATE_OF}:")
        duplicate = FileDuplicate(
            pipeline=pipeline, file_id=file_id, sha256=f["sha256"], batch_id=earlier
        )
        out.append((done_at, duplicate))
    return out


def _batch_transitions(b: dict[str, Any], since: float) -> list[Transition]:
    out: list[Transition] = []
    pipeline, batch_id = b["pipeline"], b["id"]
    if b["sealed_at"] >= since:
        sealed = BatchSealed(
            pipeline=pipeline,
            batch_id=batch_id,
            files=b["n_files"],
            bytes=b["n_bytes"],
            priority=b["priority"],
            group=b["group_key"],
        )
        out.append((b["sealed_at"], sealed))
    started = b["started_at"] or 0
    if started >= since and b["attempts"] > 0:  # the last attempt: the one the journal keeps
        attempt = BatchStarted(pipeline=pipeline, batch_id=batch_id, attempt=b["attempts"])
        out.append((started, attempt))
    finished = b["finished_at"] or 0
    if finished < since:
        return out
    if b["state"] == BatchState.PUBLISHED:
        published = BatchPublished(
            pipeline=pipeline,
            batch_id=batch_id,
            files=b["n_published"],
            quarantined=b["n_quarantined"],
            folder=b["folder"],
            **provenance_fields(_manifest_provenance(b["folder"])),
        )
        out.append((finished, published))
    elif b["state"] in (BatchState.FAILED, BatchState.QUARANTINED):
        reason = b["reason"] or Reason.EVERY_INPUT_QUARANTINED
        failed = BatchFailed(
            pipeline=pipeline, batch_id=batch_id, reason=reason, attempts=b["attempts"]
        )
        out.append((finished, failed))
    return out


def _manifest_provenance(folder: str | None) -> Provenance | None:
    """The published manifest's provenance, so that a rebuilt line says what the live one did."""
    if not folder:
        return None
    try:
        manifest = json.loads((Path(folder) / "manifest.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return Provenance.from_json(manifest.get("provenance") if isinstance(manifest, dict) else None)

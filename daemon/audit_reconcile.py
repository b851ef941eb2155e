"""Rebuild the audit lines that a crash or a full disk kept from being written. Main process.

Every transition is a journal commit first and an audit line right after; a `kill -9` between
the two, or a disk that refuses the line, leaves the journal ahead of the log. The journal is
the truth: each transition recorded since `since` that has no line in the log gets one now,
marked `recovered`.
"""

from __future__ import annotations

import time
from pathlib import Path

from daemon.audit import AuditEvent, AuditLog, read_lines
from daemon.journal import Journal

_FILE_EVENTS = {AuditEvent.FILE_RECEIVED, AuditEvent.FILE_QUARANTINED, AuditEvent.FILE_DUPLICATE}


def reconcile(journal: Journal, audit: AuditLog, folder: Path, since: float) -> int:
    """Append what is missing; return how many lines."""
    present = _present(folder, since)
    missing = [
        (at, event, fields)
        for at, event, key, fields in _transitions(journal, since)
        if (event.value, key) not in present
    ]
    for _, event, fields in sorted(missing, key=lambda item: item[0]):
        audit.append(event, recovered=True, **fields)
    audit.sync()
    return len(missing)


def _present(folder: Path, since: float) -> set[tuple[str, object]]:
    """(event, file id or batch id) of every line from the day of `since` on."""
    day = time.strftime("%Y-%m-%d", time.gmtime(since))
    found: set[tuple[str, object]] = set()
    for line in read_lines(folder):
        if str(line.get("ts", ""))[:10] < day:
            continue
        event = str(line.get("event"))
        found.add((event, line.get("file_id") if event in _FILE_EVENTS else line.get("batch_id")))
    return found


def _transitions(
    journal: Journal, since: float
) -> list[tuple[float, AuditEvent, object, dict[str, object]]]:
    """(when, event, key, fields) of each journal transition at or after `since`."""
    out: list[tuple[float, AuditEvent, object, dict[str, object]]] = []
    for f in journal.files_changed_since(since):
        if f["received_at"] >= since and f["state"] != "claiming":
            out.append(
                (
                    f["received_at"],
                    AuditEvent.FILE_RECEIVED,
                    f["id"],
                    {
                        "pipeline": f["pipeline"],
                        "file": f["name"],
                        "sha256": f["sha256"],
                        "size": f["size"],
                        "file_id": f["id"],
                    },
                )
            )
        if f["state"] == "quarantined" and (f["done_at"] or 0) >= since:
            out.append(
                (
                    f["done_at"],
                    AuditEvent.FILE_QUARANTINED,
                    f["id"],
                    {
                        "pipeline": f["pipeline"],
                        "batch_id": f["batch_id"],
                        "file_id": f["id"],
                        "sha256": f["sha256"],
                        "reason": f["reason"],
                    },
                )
            )
        if f["state"] == "duplicate" and (f["done_at"] or 0) >= since:
            earlier = str(f["reason"] or "").removeprefix("duplicate_of:")
            out.append(
                (
                    f["done_at"],
                    AuditEvent.FILE_DUPLICATE,
                    f["id"],
                    {
                        "pipeline": f["pipeline"],
                        "file_id": f["id"],
                        "sha256": f["sha256"],
                        "batch_id": earlier,
                    },
                )
            )
    for b in journal.batches_changed_since(since):
        if b["sealed_at"] >= since:
            out.append(
                (
                    b["sealed_at"],
                    AuditEvent.BATCH_SEALED,
                    b["id"],
                    {
                        "pipeline": b["pipeline"],
                        "batch_id": b["id"],
                        "files": b["n_files"],
                        "bytes": b["n_bytes"],
                        "priority": b["priority"],
                    },
                )
            )
        finished = b["finished_at"] or 0
        if b["state"] == "published" and finished >= since:
            out.append(
                (
                    finished,
                    AuditEvent.BATCH_PUBLISHED,
                    b["id"],
                    {"pipeline": b["pipeline"], "batch_id": b["id"], "folder": b["folder"]},
                )
            )
        elif b["state"] in ("failed", "quarantined") and finished >= since:
            out.append(
                (
                    finished,
                    AuditEvent.BATCH_FAILED,
                    b["id"],
                    {"pipeline": b["pipeline"], "batch_id": b["id"], "reason": b["reason"]},
                )
            )
    return out

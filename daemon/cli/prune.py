"""`medbatch prune [--dry-run]`: apply retention now (the service, while it runs, prunes itself)."""

from __future__ import annotations

import time

from daemon.audit import AuditLog
from daemon.cli.exits import EX_OK
from daemon.cli.journal_access import open_journal
from daemon.config import Settings
from daemon.instance_lock import InstanceLock
from daemon.journal import Journal
from daemon.retention import Retention, Tally

STEP_FILES = 1000


def prune(settings: Settings, *, dry_run: bool) -> int:
    if dry_run:
        with open_journal(settings) as journal:
            tallies = [] if journal is None else Retention(lambda: settings, journal).plan()
        _print(tallies, "would go")
        return EX_OK
    # Refused (75) while the service runs: it is the only writer of the journal and the log.
    with InstanceLock(settings.paths.state):
        if not settings.paths.journal.exists():
            _print([], "pruned")  # the service never ran here
            return EX_OK
        journal = Journal(settings.paths.journal)
        try:
            tallies = _apply(settings, journal)
        finally:
            journal.close()
    _print(tallies, "pruned")
    return EX_OK


def _apply(settings: Settings, journal: Journal) -> list[Tally]:
    retention = Retention(lambda: settings, journal)
    merged: dict[tuple[str, str | None], Tally] = {}
    with AuditLog(settings.paths.audit) as audit:
        while True:
            for tally in retention.step(STEP_FILES):
                audit.record(tally.record())
                total = merged.setdefault(
                    (tally.kind, tally.pipeline), Tally(tally.kind, tally.pipeline)
                )
                total.files += tally.files
                total.bytes += tally.bytes
            audit.sync()
            journal.set_meta(audit_head=list(audit.head), audit_head_at=time.time())
            if not retention.has_more:
                break
    return list(merged.values())


def _print(tallies: list[Tally], verb: str) -> None:
    if not tallies:
        print("nothing to prune: everything is within its retention")
        return
    for t in sorted(tallies, key=lambda t: (t.pipeline or "", t.kind)):
        unit = "rows" if t.kind == "journal" else "files"
        where = f"pipeline {t.pipeline}" if t.pipeline else "audit log"
        print(f"{where}: {t.kind}: {t.files} {unit}, {t.bytes} bytes {verb}")

"""`medbatch requeue FILE-OR-SHA256 [--all --reason R] [--force]`: a quarantined input back
through its pipeline's inbox; works beside the running service (which links the new row)."""

from __future__ import annotations

import os
import sys
from pathlib import Path

from daemon.cli.exits import EX_FAIL, EX_OK, EX_USAGE
from daemon.cli.journal_access import open_journal
from daemon.cli.output import printable
from daemon.config import Settings
from daemon.disposal import copies_of
from daemon.journal import FileRow
from daemon.models import Facts
from daemon.requeue import hand_back, is_transient, pending_ids

Candidate = tuple[FileRow, Path]


def requeue(
    settings: Settings, key: str | None, *, every: bool, reason: str | None, force: bool
) -> int:
    if every == (key is not None):
        print("medbatch: give one FILE-OR-SHA256, or --all (with --reason R)", file=sys.stderr)
        return EX_USAGE
    with open_journal(settings) as journal:
        rows = [] if journal is None else journal.quarantined_files()
    candidates = _candidates(settings, rows)
    pending = pending_ids(settings.paths.state)
    chosen = [
        c
        for c in candidates
        if c[0].id not in pending
        and (reason is None or c[0].reason == reason)
        and (every or _matches(key or "", c))
    ]
    if not chosen:
        print(f"no quarantined input to requeue matches {printable(key or reason or 'all')}")
        return EX_FAIL
    status = EX_OK
    for row, copy in chosen:
        if not (force or is_transient(row.reason)):
            print(
                f"file {row.id}: refused: quarantined for {row.reason}, which would recur on the "
                "same bytes (give --force to try anyway)"
            )
            status = EX_FAIL
            continue
        if row.pipeline not in {p.name for p in settings.pipeline}:
            print(f"file {row.id}: refused: pipeline {row.pipeline} is no longer configured")
            status = EX_FAIL
            continue
        target = hand_back(
            settings.paths.state,
            settings.paths.inbox,
            row,
            copy,
            forced=not is_transient(row.reason),
        )
        print(f"file {row.id}: requeued into {printable(target)} ({row.reason})")
    return status


def _candidates(settings: Settings, rows: list[tuple[FileRow, Facts]]) -> list[Candidate]:
    """Quarantined inputs whose copy is still there (not pruned, not requeued already)."""
    by_name = {p.name: p for p in settings.pipeline}
    out = []
    for row, facts in rows:
        for _, path in copies_of(settings.paths, by_name, row, facts):
            if os.path.lexists(path):
                out.append((row, path))
    return out


def _matches(key: str, candidate: Candidate) -> bool:
    row, copy = candidate
    if key in (row.sha256, row.name, str(row.id)):
        return True
    return os.path.lexists(key) and os.path.realpath(key) == os.path.realpath(copy)

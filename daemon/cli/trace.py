"""`medbatch trace FILE-OR-SHA256`: the lineage of one input, from the journal and the audit log."""

from __future__ import annotations

import sys
import time
from collections.abc import Iterator
from pathlib import Path

from daemon.audit import hash_name, read_lines, read_name_key
from daemon.audit.events import AuditEvent
from daemon.cli.exits import EX_FAIL, EX_OK
from daemon.cli.journal_access import open_journal
from daemon.cli.output import printable
from daemon.config import Settings
from daemon.disposal import copies_of
from daemon.errors import MedbatchError
from daemon.journal_queries import BatchRow, FileRow, JournalQueries
from daemon.models import BatchState, Facts

AuditLine = dict[str, object]


def trace(settings: Settings, key: str) -> int:
    with open_journal(settings) as journal:
        names = _name_forms(settings, key)
        rows = _find_rows(journal, settings, key, names) if journal is not None else []
        batches = {
            row.batch_id: journal.batch(row.batch_id)
            for row in rows
            if journal is not None and row.batch_id
        }
        facts = {row.id: journal.file_facts(row.id) for row in rows if journal is not None}
    by_file, rejected = _events(settings, rows, names)
    if not rows and not rejected:
        print(f"unknown input: {printable(key)}")
        return EX_FAIL
    for row in rows:
        _print_row(settings, row, batches.get(row.batch_id or ""), by_file[row.id], facts[row.id])
    for line in rejected:
        logged = "" if line.get("file") == key else f" (logged as {printable(line.get('file'))})"
        print(
            f"inbox entry {printable(key)}{logged} in pipeline {line.get('pipeline')}: "
            f"refused ({line.get('reason')}), never opened, left where it was"
        )
        print(f"  {line['ts']} {line['event']}")
    return EX_OK


def _audit_lines(settings: Settings) -> Iterator[AuditLine]:
    """Every readable audit line; a damaged one ends the walk with a note (trace still shows
    what the journal knows)."""
    try:
        yield from read_lines(settings.paths.audit)
    except ValueError as exc:
        print(
            f"medbatch: note: audit log unreadable ({exc}); later events are not shown; "
            "run `medbatch audit verify`",
            file=sys.stderr,
        )


def _name_forms(settings: Settings, key: str) -> set[str]:
    """The key as written in audit lines: itself, and its keyed hash where names are hashed."""
    forms = {key}
    try:
        name_key = read_name_key(settings.paths.state)
    except MedbatchError as exc:
        print(f"medbatch: note: {exc}; hashed names are not matched", file=sys.stderr)
        return forms
    if name_key is not None:
        forms.add(hash_name(name_key, key))
    return forms


def _find_rows(
    journal: JournalQueries, settings: Settings, key: str, names: set[str]
) -> list[FileRow]:
    rows = journal.find_files(key)
    if rows:
        return rows
    # A hashed name copied from an audit line: find the file through that line's sha256.
    found: dict[int, FileRow] = {}
    for line in _audit_lines(settings):
        if line.get("file") in names and isinstance(line.get("sha256"), str):
            for row in journal.find_files(str(line["sha256"])):
                if row.id == line.get("file_id"):
                    found[row.id] = row
    return list(found.values())


def _events(
    settings: Settings, rows: list[FileRow], names: set[str]
) -> tuple[dict[int, list[AuditLine]], list[AuditLine]]:
    """Audit lines per file id (its own and its batch's), and inbox rejections of the name."""
    by_batch = {row.batch_id: row.id for row in rows if row.batch_id}
    by_file: dict[int, list[AuditLine]] = {row.id: [] for row in rows}
    rejected: list[AuditLine] = []
    for line in _audit_lines(settings):
        file_id, batch_id = line.get("file_id"), line.get("batch_id")
        new_id = line.get("new_file_id")
        if isinstance(new_id, int) and new_id in by_file:
            by_file[new_id].append(line)  # requeued: the new incarnation shows where it came from
        if isinstance(file_id, int) and file_id in by_file:
            by_file[file_id].append(line)
        elif file_id is None and isinstance(batch_id, str) and batch_id in by_batch:
            by_file[by_batch[batch_id]].append(line)
        elif line.get("event") == AuditEvent.FILE_REJECTED and line.get("file") in names:
            rejected.append(line)
    return by_file, rejected


def _print_row(
    settings: Settings,
    row: FileRow,
    batch: BatchRow | None,
    lines: list[AuditLine],
    facts: Facts,
) -> None:
    received = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(row.received_at))
    print(f"file {row.id}: {printable(row.name)} in pipeline {printable(row.pipeline)}")
    print(f"  sha256 {row.sha256}, {row.size} bytes, received {received}")
    print(f"  state {row.state}" + (f" ({row.reason})" if row.reason else ""))
    if batch is not None:
        print(f"  batch {batch.id}: {batch.state}, attempts {batch.attempts}")
        if batch.state == BatchState.PUBLISHED:
            result = settings.paths.outbox / batch.pipeline / batch.id
            print(f"  result {printable(result)}{_exists(result)}")
    pipelines = {p.name: p for p in settings.pipeline}
    for what, where in copies_of(settings.paths, pipelines, row, facts):
        print(f"  {what} {printable(where)}{_exists(where)}")
    for line in lines:
        said = ", ".join(
            f"{k}={printable(line[k])}"
            for k in ("attempt", "reason", "batch_id", "file_id", "new_file_id")
            if k in line
        )
        print(f"  {line['ts']} {line['event']}" + (f" ({said})" if said else ""))


def _exists(path: Path) -> str:
    return "" if path.exists() else " (not there: deleted or moved)"

"""The `medbatch` command line: run, check-config, status, audit verify, trace.

`status`, `audit verify` and `trace` run beside the service: they open the journal read-only
(a WAL reader neither blocks the service nor waits for it) and only read the audit log.
"""

from __future__ import annotations

import argparse
import calendar
import contextlib
import json
import os
import sqlite3
import sys
import time
import traceback
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import structlog

from daemon import __version__
from daemon.audit import hash_name, read_lines, read_name_key, verify
from daemon.config import Settings, config_path_from, load_settings
from daemon.errors import ConfigError, JournalCorruptError, MedbatchError
from daemon.journal import BatchRow, FileRow, Journal
from daemon.liveness import NOT_STARTED, assess
from daemon.logs import LEVELS, configure_logging

EX_OK = 0
EX_FAIL = 1
EX_NOT_RUNNING = 3
EX_DATAERR = 65
EX_CONFIG = 78
EX_SOFTWARE = 70

# Error type → exit status; the first match wins.
EXIT_CODES: tuple[tuple[type[BaseException], int], ...] = (
    (ConfigError, EX_CONFIG),
    (JournalCorruptError, EX_DATAERR),
    (MedbatchError, EX_FAIL),
)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="medbatch", description=__doc__)
    parser.add_argument("--version", action="version", version=f"medbatch {__version__}")
    parser.add_argument(
        "--config", help="config file (default: $MEDBATCH_CONFIG, else config/medbatch.toml)"
    )
    parser.add_argument(
        "--log-level",
        type=str.upper,
        choices=LEVELS,
        default=os.environ.get("MEDBATCH_LOG_LEVEL", "INFO"),
        help="default: $MEDBATCH_LOG_LEVEL, else INFO",
    )
    commands = parser.add_subparsers(dest="command", required=True)
    run = commands.add_parser("run", help="run the service in the foreground")
    run.add_argument(
        "--once", action="store_true", help="take what is in the inboxes, publish it all, exit"
    )
    check = commands.add_parser("check-config", help="validate a config, print the settings")
    check.add_argument("path", nargs="?")
    status = commands.add_parser("status", help="per pipeline: waiting, in flight, published")
    status.add_argument("--json", action="store_true")
    audit = commands.add_parser("audit", help="audit log tools")
    audit_commands = audit.add_subparsers(dest="audit_command", required=True)
    audit_commands.add_parser("verify", help="check the audit log's hash chain end to end")
    trace = commands.add_parser("trace", help="the lineage of one input")
    trace.add_argument("key", metavar="FILE-OR-SHA256")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        configure_logging(args.log_level)
        if args.command == "check-config":
            return check_config(Path(args.path) if args.path else config_path_from(args.config))
        settings = load_settings(config_path_from(args.config))
        if args.command == "run":
            from daemon.supervisor import Supervisor

            return Supervisor(settings, once=args.once).run()
        if args.command == "status":
            return status(settings, as_json=args.json)
        if args.command == "audit":
            return audit_verify(settings)
        return trace(settings, args.key)
    except Exception as exc:
        for error_type, code in EXIT_CODES:
            if isinstance(exc, error_type):
                print(f"medbatch: {exc}", file=sys.stderr)
                return code
        # A bug or an I/O failure: no message text (it can quote a path or a value), only the
        # type and where; systemd restarts the service and recovery picks up from the journal.
        frames = [
            f"{Path(f.filename).name}:{f.lineno}:{f.name}"
            for f in traceback.extract_tb(exc.__traceback__)
        ]
        structlog.get_logger().critical(
            "daemon.crashed", error=type(exc).__name__, frames=frames[-8:]
        )
        return EX_SOFTWARE


def check_config(path: Path) -> int:
    settings = load_settings(path)
    print(json.dumps(settings.model_dump(mode="json"), indent=2))
    if settings.workers.executor == "dask":
        print(
            f"note: executor = 'dask': every Dask worker must read {settings.paths.spool} and "
            f"write {settings.paths.outbox} at these same paths (shared storage); the service "
            "checks it at start with a probe task",
            file=sys.stderr,
        )
    return EX_OK


class JournalUnreadableError(MedbatchError):
    """The journal could not be read."""


@contextlib.contextmanager
def _journal(settings: Settings) -> Iterator[Journal | None]:
    """The journal, read-only, or None when the service never ran here."""
    path = settings.paths.journal
    if not path.exists():
        yield None
        return
    try:
        journal = Journal(path, readonly=True)
        try:
            yield journal
        finally:
            journal.close()
    except sqlite3.DatabaseError as exc:
        raise JournalUnreadableError(f"cannot read the journal {path}: {exc}") from exc


# -- status -------------------------------------------------------------------------------


def _service_state(journal: Journal, now: float) -> dict[str, Any]:
    """From the heartbeat the service records in the journal's meta table."""
    return assess(journal.meta, now).as_dict()


def _start_of_day(now: float) -> float:
    """UTC midnight (the audit log's days are UTC days too)."""
    return float(calendar.timegm((*time.gmtime(now)[:3], 0, 0, 0)))


def _pipeline_report(journal: Journal, settings: Settings, now: float) -> dict[str, Any]:
    with journal.snapshot():
        files, batches = journal.file_counts(), journal.batch_counts()
        today = _start_of_day(now)
        files_today, batches_today = (
            journal.file_counts(since=today),
            journal.batch_counts(since=today),
        )
        open_files, waiting = journal.open_files(), journal.waiting_batches()
        oldest = journal.oldest_waiting()
    priorities = {p.name: p.priority for p in settings.pipeline}
    names = list(priorities) + sorted({p for p, _ in files} - set(priorities))
    report = {}
    for name in names:
        by_priority = {str(prio): n for (p, prio), n in sorted(waiting.items()) if p == name}
        opened = open_files.get(name)
        report[name] = {
            "priority": priorities.get(name),
            "configured": name in priorities,
            "open_batch": (
                None
                if opened is None
                else {"files": opened[0], "age_s": round(max(0.0, now - opened[1]), 1)}
            ),
            "waiting_batches": by_priority,
            "in_flight": batches.get((name, "running"), 0),
            "published_today": {
                "batches": batches_today.get((name, "published"), 0),
                "files": files_today.get((name, "published"), 0),
            },
            "published_files": files.get((name, "published"), 0),
            "quarantined": files.get((name, "quarantined"), 0),
            "quarantined_today": files_today.get((name, "quarantined"), 0),
            "duplicates": files.get((name, "duplicate"), 0),
            "oldest_waiting_s": (
                round(max(0.0, now - oldest[name]), 1) if name in oldest else None
            ),
        }
    return report


def status(settings: Settings, *, as_json: bool) -> int:
    now = time.time()
    with _journal(settings) as journal:
        if journal is None:
            report: dict[str, Any] = {**_not_started(), "pipelines": {}}
        else:
            report = {
                **_service_state(journal, now),
                "pipelines": _pipeline_report(journal, settings, now),
            }
    report["day"] = time.strftime("%Y-%m-%d", time.gmtime(now))
    if as_json:
        print(json.dumps(report, indent=2))
    else:
        _print_status(report)
    if not report["running"]:
        return EX_NOT_RUNNING
    return EX_OK if report["healthy"] else EX_FAIL


def _not_started() -> dict[str, Any]:
    return NOT_STARTED.as_dict()


_COLUMNS = (
    ("pipeline", 16),
    ("prio", 5),
    ("open batch", 16),
    ("waiting", 14),
    ("in flight", 10),
    ("published today", 20),
    ("quarantined", 12),
    ("oldest waiting", 15),
)


def _print_status(report: dict[str, Any]) -> None:
    line = f"medbatch: {report['state']}"
    if report["pid"] is not None:
        line += f" (pid {report['pid']}, heartbeat {report['heartbeat_age_s']} s ago)"
    print(line)
    if report["problem"]:
        print(f"  {report['problem']}")
    if not report["pipelines"]:
        return
    print("".join(f"{title:<{width}}" for title, width in _COLUMNS).rstrip())
    for name, row in report["pipelines"].items():
        opened = row["open_batch"]
        waiting = row["waiting_batches"]
        published = row["published_today"]
        cells = (
            name if row["configured"] else f"{name} (removed)",
            "-" if row["priority"] is None else str(row["priority"]),
            "-" if opened is None else f"{_files(opened['files'])}, {_age(opened['age_s'])}",
            ", ".join(f"p{prio}: {n}" for prio, n in waiting.items()) or "0",
            str(row["in_flight"]),
            f"{published['batches']} ({_files(published['files'])})",
            f"{row['quarantined']} ({row['quarantined_today']} today)",
            _age(row["oldest_waiting_s"]),
        )
        widths = [width for _, width in _COLUMNS]
        print(
            "".join(f"{cell:<{width}}" for cell, width in zip(cells, widths, strict=True)).rstrip()
        )
    print(f"(today = {report['day']} UTC; published today: batches (files))")


def _files(n: int) -> str:
    return f"{n} file" if n == 1 else f"{n} files"


def _age(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    if seconds < 120:
        return f"{seconds:.0f} s"
    if seconds < 7200:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"


# -- audit verify -------------------------------------------------------------------------


def audit_verify(settings: Settings) -> int:
    head = None
    with _journal(settings) as journal:
        stored = journal.meta("audit_head") if journal is not None else None
    if stored and stored[0]:
        head = (int(stored[0]), str(stored[1]))
    report = verify(settings.paths.audit, expected_head=head)
    if not report.ok:
        print(f"audit log BROKEN: {report.error}")
        return EX_FAIL
    notes = []
    if report.torn_tail:
        notes.append("the last line was torn by a crash: tolerated, not counted")
    if head is None:
        notes.append("no chain head in the journal: a cut-off end cannot be detected")
    else:
        notes.append(f"reaches the journal's head, seq {head[0]}")
    print(f"audit log intact: {report.lines} lines in {report.files} files; " + "; ".join(notes))
    return EX_OK


# -- trace --------------------------------------------------------------------------------

AuditLine = dict[str, object]


def trace(settings: Settings, key: str) -> int:
    names = _name_forms(settings, key)
    with _journal(settings) as journal:
        rows = _find_rows(journal, settings, key, names) if journal is not None else []
        batches = {
            row.batch_id: journal.batch(row.batch_id)
            for row in rows
            if journal is not None and row.batch_id
        }
    by_file, rejected = _events(settings, rows, names)
    if not rows and not rejected:
        print(f"unknown input: {key}")
        return EX_FAIL
    for row in rows:
        _print_row(settings, row, batches.get(row.batch_id or ""), by_file[row.id])
    for line in rejected:
        logged = "" if line.get("file") == key else f" (logged as {line.get('file')})"
        print(
            f"inbox entry {key}{logged} in pipeline {line.get('pipeline')}: "
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


def _find_rows(journal: Journal, settings: Settings, key: str, names: set[str]) -> list[FileRow]:
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
        if isinstance(file_id, int) and file_id in by_file:
            by_file[file_id].append(line)
        elif file_id is None and isinstance(batch_id, str) and batch_id in by_batch:
            by_file[by_batch[batch_id]].append(line)
        elif line.get("event") == "file.rejected" and line.get("file") in names:
            rejected.append(line)
    return by_file, rejected


def _print_row(
    settings: Settings, row: FileRow, batch: BatchRow | None, lines: list[AuditLine]
) -> None:
    received = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(row.received_at))
    print(f"file {row.id}: {row.name} in pipeline {row.pipeline}")
    print(f"  sha256 {row.sha256}, {row.size} bytes, received {received}")
    print(f"  state {row.state}" + (f" ({row.reason})" if row.reason else ""))
    if batch is not None:
        print(f"  batch {batch.id}: {batch.state}, attempts {batch.attempts}")
        if batch.state == "published":
            result = settings.paths.outbox / batch.pipeline / batch.id
            print(f"  result {result}{_exists(result)}")
    for what, where in _copies(settings, row):
        print(f"  {what} {where}{_exists(where)}")
    for line in lines:
        facts = ", ".join(f"{k}={line[k]}" for k in ("attempt", "reason", "batch_id") if k in line)
        print(f"  {line['ts']} {line['event']}" + (f" ({facts})" if facts else ""))


def _copies(settings: Settings, row: FileRow) -> list[tuple[str, Path]]:
    """Where the input itself went once its batch finished (see Supervisor._dispose)."""
    paths = settings.paths
    if row.state == "quarantined":
        return [("quarantined copy", paths.quarantine / row.pipeline / row.name)]
    if row.state not in ("published", "duplicate"):
        return [("spooled copy", paths.spool / row.spool_name)]
    pipeline = next((p for p in settings.pipeline if p.name == row.pipeline), None)
    if row.state == "published" and pipeline is not None and pipeline.after_publish == "delete":
        return []
    day = time.strftime("%Y-%m-%d", time.gmtime(row.received_at))
    return [("archived copy", paths.archive / row.pipeline / day / Path(row.spool_name).name)]


def _exists(path: Path) -> str:
    return "" if path.exists() else " (not there: deleted or moved)"

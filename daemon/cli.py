"""The `medbatch` command line: run, check-config, status, audit verify, trace."""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

from daemon import __version__
from daemon.audit import read_lines, verify
from daemon.config import Settings, config_path_from, load_settings
from daemon.errors import ConfigError, JournalCorruptError, MedbatchError
from daemon.journal import Journal
from daemon.logs import configure_logging

EX_OK = 0
EX_FAIL = 1
EX_NOT_RUNNING = 3
EX_DATAERR = 65
EX_CONFIG = 78

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
    parser.add_argument("--log-level", default=os.environ.get("MEDBATCH_LOG_LEVEL", "INFO"))
    commands = parser.add_subparsers(dest="command", required=True)
    run = commands.add_parser("run", help="run the service in the foreground")
    run.add_argument(
        "--once", action="store_true", help="take what is in the inboxes, publish it all, exit"
    )
    check = commands.add_parser("check-config", help="validate a config, print the settings")
    check.add_argument("path", nargs="?")
    status = commands.add_parser("status", help="counts per pipeline, from the journal")
    status.add_argument("--json", action="store_true")
    audit = commands.add_parser("audit", help="audit log tools")
    audit_commands = audit.add_subparsers(dest="audit_command", required=True)
    audit_commands.add_parser("verify", help="check the audit log's hash chain end to end")
    trace = commands.add_parser("trace", help="the lineage of one input")
    trace.add_argument("key", metavar="FILE-OR-SHA256")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    configure_logging(args.log_level)
    try:
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
    except BaseException as exc:
        for error_type, code in EXIT_CODES:
            if isinstance(exc, error_type):
                print(f"medbatch: {exc}", file=sys.stderr)
                return code
        raise


def check_config(path: Path) -> int:
    settings = load_settings(path)
    print(json.dumps(settings.model_dump(mode="json"), indent=2))
    return EX_OK


def _open_journal(settings: Settings) -> Journal | None:
    if not settings.paths.journal.exists():
        return None
    return Journal(settings.paths.journal, readonly=True)


def _is_running(journal: Journal) -> tuple[bool, bool]:
    """(running, healthy) from the service's heartbeat in the journal."""
    beat, pid = journal.meta("heartbeat"), journal.meta("pid")
    interval = float(journal.meta("heartbeat_s") or 5.0)
    if beat is None or pid is None or time.time() - float(beat) > 3 * interval + 5:
        return False, False
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return False, False
    except PermissionError:
        pass
    return True, bool(journal.meta("healthy"))


def status(settings: Settings, *, as_json: bool) -> int:
    journal = _open_journal(settings)
    report: dict[str, Any] = {"running": False, "healthy": False, "pipelines": {}}
    if journal is not None:
        report["running"], report["healthy"] = _is_running(journal)
        files, batches = journal.file_counts(), journal.batch_counts()
        oldest = journal.oldest_waiting()
        for p in settings.pipeline:
            report["pipelines"][p.name] = {
                "priority": p.priority,
                "pending": files.get((p.name, "received"), 0),
                "waiting_batches": batches.get((p.name, "sealed"), 0),
                "in_flight": batches.get((p.name, "running"), 0),
                "published_files": files.get((p.name, "published"), 0),
                "published_batches": batches.get((p.name, "published"), 0),
                "quarantined": files.get((p.name, "quarantined"), 0),
                "duplicates": files.get((p.name, "duplicate"), 0),
                "oldest_waiting_s": (
                    round(time.time() - oldest[p.name], 1) if p.name in oldest else None
                ),
            }
        journal.close()
    if as_json:
        print(json.dumps(report, indent=2))
    else:
        _print_status(report)
    if not report["running"]:
        return EX_NOT_RUNNING
    return EX_OK if report["healthy"] else EX_FAIL


def _print_status(report: dict[str, Any]) -> None:
    state = ("running" if report["healthy"] else "degraded") if report["running"] else "not running"
    print(f"medbatch: {state}")
    columns = [
        "pending",
        "waiting_batches",
        "in_flight",
        "published_files",
        "quarantined",
        "duplicates",
        "oldest_waiting_s",
    ]
    print(f"{'pipeline':<16}{'prio':>5}" + "".join(f"{c:>18}" for c in columns))
    for name, row in report["pipelines"].items():
        cells = "".join(f"{'-' if row[c] is None else row[c]!s:>18}" for c in columns)
        print(f"{name:<16}{row['priority']:>5}{cells}")


def audit_verify(settings: Settings) -> int:
    head = None
    journal = _open_journal(settings)
    if journal is not None:
        stored = journal.meta("audit_head")
        head = (int(stored[0]), str(stored[1])) if stored and stored[0] else None
        journal.close()
    report = verify(settings.paths.audit, expected_head=head)
    if report.ok:
        torn = " (the last line is torn by a crash: tolerated)" if report.torn_tail else ""
        print(f"audit log intact: {report.lines} lines in {report.files} files{torn}")
        return EX_OK
    print(f"audit log BROKEN: {report.error}")
    return EX_FAIL


def trace(settings: Settings, key: str) -> int:
    journal = _open_journal(settings)
    rows = journal.find_files(key) if journal is not None else []
    if journal is None or not rows:
        print(f"unknown input: {key}")
        return EX_FAIL
    for row in rows:
        batch = journal.batch(row.batch_id) if row.batch_id else None
        print(f"file {row.id}: {row.name} in pipeline {row.pipeline}")
        print(
            f"  sha256 {row.sha256}, {row.size} bytes, received "
            f"{time.strftime('%Y-%m-%dT%H:%M:%SZ', time.gmtime(row.received_at))}"
        )
        print(f"  state {row.state}" + (f" ({row.reason})" if row.reason else ""))
        if batch is not None:
            print(
                f"  batch {batch.id}: {batch.state}, attempts {batch.attempts}"
                + (f", published in {batch.folder}" if batch.folder else "")
            )
        for line in read_lines(settings.paths.audit):
            if line.get("file_id") == row.id or (
                batch is not None and line.get("batch_id") == batch.id and "file_id" not in line
            ):
                print(f"  {line['ts']} {line['event']}")
    journal.close()
    return EX_OK

"""`medbatch status [--json]`: per pipeline counts from the journal, and whether the service is
running and healthy (its heartbeat in the journal). Exit 0 healthy, 1 degraded, 3 not running."""

from __future__ import annotations

import calendar
import json
import time
from typing import Any

from daemon.cli.exits import EX_FAIL, EX_NOT_RUNNING, EX_OK
from daemon.cli.journal_access import open_journal
from daemon.cli.output import printable
from daemon.config import Settings
from daemon.journal_queries import JournalQueries
from daemon.liveness import NOT_STARTED, assess
from daemon.models import BatchState, FileState


def _service_state(journal: JournalQueries, now: float) -> dict[str, Any]:
    """From the heartbeat the service records in the journal's meta table."""
    return assess(journal.meta, now).as_dict()


def _start_of_day(now: float) -> float:
    """UTC midnight (the audit log's days are UTC days too)."""
    return float(calendar.timegm((*time.gmtime(now)[:3], 0, 0, 0)))


def _pipeline_report(journal: JournalQueries, settings: Settings, now: float) -> dict[str, Any]:
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
            "in_flight": batches.get((name, BatchState.RUNNING), 0),
            "published_today": {
                "batches": batches_today.get((name, BatchState.PUBLISHED), 0),
                "files": files_today.get((name, FileState.PUBLISHED), 0),
            },
            "published_files": files.get((name, FileState.PUBLISHED), 0),
            "quarantined": files.get((name, FileState.QUARANTINED), 0),
            "quarantined_today": files_today.get((name, FileState.QUARANTINED), 0),
            "duplicates": files.get((name, FileState.DUPLICATE), 0),
            "oldest_waiting_s": (
                round(max(0.0, now - oldest[name]), 1) if name in oldest else None
            ),
        }
    return report


def status(settings: Settings, *, as_json: bool) -> int:
    now = time.time()
    with open_journal(settings) as journal:
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
            printable(name) if row["configured"] else f"{printable(name)} (removed)",
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

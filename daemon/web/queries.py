"""Read-only journal queries for the status page, /healthz and the state gauges.

Run in the HTTP server's threads, each on its own read-only SQLite connection: a WAL reader never
blocks the main loop (the only writer) nor waits for it. No file name is ever selected.
"""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Iterator
from contextlib import closing, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from daemon.models import BatchState, FileState

RECENT_BATCHES = 10
QUARANTINE_ROWS = 20
LISTED_BATCHES = 20
HOUR_S = 3600.0


@dataclass(frozen=True, slots=True)
class BatchLine:
    batch_id: str
    state: str
    priority: int
    n_files: int
    at: float | None  # sealed (waiting), started (in flight) or finished (recent)
    attempts: int = 0
    reason: str | None = None


@dataclass(frozen=True, slots=True)
class QuarantineLine:
    file_id: int
    sha256: str | None
    reason: str | None
    batch_id: str | None
    at: float | None


@dataclass
class PipelineView:
    name: str
    open_files: int = 0
    open_since: float | None = None
    waiting: list[BatchLine] = field(default_factory=list)
    in_flight: list[BatchLine] = field(default_factory=list)
    recent: list[BatchLine] = field(default_factory=list)
    files_last_hour: int = 0
    batches_last_hour: int = 0
    quarantine: list[QuarantineLine] = field(default_factory=list)
    quarantine_by_reason: dict[str, int] = field(default_factory=dict)
    oldest_waiting: float | None = None
    last_publish: float | None = None


class JournalReader:
    """One read-only connection per use (`with reader.open() as q:`), made in the calling thread."""

    def __init__(self, path: Path) -> None:
        self.path = path

    @contextmanager
    def open(self) -> Iterator[JournalQueries]:
        uri = f"{self.path.resolve().as_uri()}?mode=ro"
        with closing(sqlite3.connect(uri, uri=True, isolation_level=None, timeout=2.0)) as db:
            db.execute("BEGIN DEFERRED")  # one snapshot for every query of the request
            try:
                yield JournalQueries(db)
            finally:
                db.execute("COMMIT")


class JournalQueries:
    def __init__(self, db: sqlite3.Connection) -> None:
        self._db = db

    def meta(self, key: str) -> Any:
        row = self._db.execute("SELECT value FROM meta WHERE key=?", (key,)).fetchone()
        return None if row is None else json.loads(row[0])

    def pipelines(self) -> list[str]:
        rows = self._db.execute(
            "SELECT pipeline FROM files UNION SELECT pipeline FROM batches ORDER BY 1"
        ).fetchall()
        return [str(r[0]) for r in rows]

    def oldest_waiting(self) -> dict[str, float]:
        rows = self._db.execute(
            "SELECT pipeline, min(received_at) FROM files "
            f"WHERE state IN ('{FileState.RECEIVED}', '{FileState.BATCHED}') GROUP BY pipeline"
        ).fetchall()
        return {str(p): float(t) for p, t in rows}

    def last_publish(self) -> dict[str, float]:
        rows = self._db.execute(
            "SELECT pipeline, max(finished_at) FROM batches "
            f"WHERE state='{BatchState.PUBLISHED}' AND finished_at IS NOT NULL GROUP BY pipeline"
        ).fetchall()
        return {str(p): float(t) for p, t in rows}

    def views(self, names: list[str], now: float) -> dict[str, PipelineView]:
        """Everything the page shows, per pipeline (configured ones first, then the rest)."""
        views = {n: PipelineView(n) for n in [*names, *self.pipelines()] if n}
        self._fill_open(views)
        self._fill_batches(views)
        self._fill_throughput(views, now - HOUR_S)
        self._fill_quarantine(views)
        for name, ts in self.oldest_waiting().items():
            views[name].oldest_waiting = ts
        for name, ts in self.last_publish().items():
            views[name].last_publish = ts
        return views

    def published_folder(self, pipeline: str, batch_id: str) -> str | None:
        """The folder the journal recorded for a published batch of `pipeline`, else None."""
        row = self._db.execute(
            "SELECT folder FROM batches WHERE id=? AND pipeline=? "
            f"AND state='{BatchState.PUBLISHED}'",
            (batch_id, pipeline),
        ).fetchone()
        return None if row is None or row[0] is None else str(row[0])

    def _fill_open(self, views: dict[str, PipelineView]) -> None:
        for p, n, since in self._db.execute(
            "SELECT pipeline, count(*), min(received_at) FROM files "
            f"WHERE state='{FileState.RECEIVED}' GROUP BY pipeline"
        ):
            views[p].open_files, views[p].open_since = int(n), float(since)

    def _fill_batches(self, views: dict[str, PipelineView]) -> None:
        lists = (
            ("waiting", f"state='{BatchState.SEALED}'", "sealed_at", "priority, sealed_at"),
            ("in_flight", f"state='{BatchState.RUNNING}'", "started_at", "started_at"),
            (
                "recent",
                f"state NOT IN ('{BatchState.SEALED}', '{BatchState.RUNNING}')",
                "finished_at",
                "finished_at DESC",
            ),
        )
        for attr, where, at, order in lists:
            limit = RECENT_BATCHES if attr == "recent" else LISTED_BATCHES
            for view in views.values():
                rows = self._db.execute(
                    f"SELECT id, state, priority, n_files, {at}, attempts, reason FROM batches "
                    f"WHERE pipeline=? AND {where} ORDER BY {order} LIMIT ?",
                    (view.name, limit),
                ).fetchall()
                getattr(view, attr).extend(BatchLine(*row) for row in rows)

    def _fill_throughput(self, views: dict[str, PipelineView], since: float) -> None:
        for p, n in self._db.execute(
            "SELECT pipeline, count(*) FROM files "
            f"WHERE state='{FileState.PUBLISHED}' AND done_at >= ? GROUP BY pipeline",
            (since,),
        ):
            views[p].files_last_hour = int(n)
        for p, n in self._db.execute(
            "SELECT pipeline, count(*) FROM batches "
            f"WHERE state='{BatchState.PUBLISHED}' AND finished_at >= ? GROUP BY pipeline",
            (since,),
        ):
            views[p].batches_last_hour = int(n)

    def _fill_quarantine(self, views: dict[str, PipelineView]) -> None:
        for p, reason, n in self._db.execute(
            "SELECT pipeline, coalesce(reason, ''), count(*) FROM files "
            f"WHERE state='{FileState.QUARANTINED}' GROUP BY pipeline, reason"
        ):
            views[p].quarantine_by_reason[str(reason)] = int(n)
        for view in views.values():
            rows = self._db.execute(
                "SELECT id, sha256, reason, batch_id, done_at FROM files "
                f"WHERE pipeline=? AND state='{FileState.QUARANTINED}' "
                "ORDER BY done_at DESC, id DESC LIMIT ?",
                (view.name, QUARANTINE_ROWS),
            ).fetchall()
            view.quarantine.extend(QuarantineLine(*row) for row in rows)

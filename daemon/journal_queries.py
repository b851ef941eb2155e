"""Read-only queries on the journal: status, trace, recovery and the audit reconciler read here.

`JournalQueries.open_readonly(path)` works beside a running service (a WAL reader never blocks).
"""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Container, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

from daemon.models import TERMINAL_FILE_STATES, BatchState, Facts, FileState

_TERMINAL = ",".join(f"'{s}'" for s in TERMINAL_FILE_STATES)
# Values in one `IN (...)`: well under SQLite's limit on bound parameters.
_IN_CHUNK = 500
# The content index's key: this many leading hex digits of a sha256 (64 bits; schema.sql).
SHA_KEY_CHARS = 16


class FileRow(NamedTuple):
    """A row of `files` (a tuple: disposal reads every finished batch's rows, thousands a
    minute on a backlog, and a tuple is built in a fifth of a frozen dataclass's time)."""

    id: int
    pipeline: str
    name: str
    spool_name: str
    sha256: str | None
    size: int | None
    received_at: float
    state: str
    batch_id: str | None
    reason: str | None
    group_key: str | None = None  # batch_by pipelines only


@dataclass(frozen=True, slots=True)
class BatchRow:
    id: str
    pipeline: str
    priority: int
    state: str
    opened_at: float
    sealed_at: float
    attempts: int
    folder: str | None


class JournalQueries:
    def __init__(self, path: Path, db: sqlite3.Connection) -> None:
        self.path = path
        self._db = db

    @classmethod
    def open_readonly(cls, path: Path) -> JournalQueries:
        uri = f"{path.resolve().as_uri()}?mode=ro"
        return cls(path, sqlite3.connect(uri, uri=True, isolation_level=None, timeout=5.0))

    def close(self) -> None:
        self._db.close()

    def _has_group_key(self) -> bool:
        columns = self._db.execute("SELECT name FROM pragma_table_info('files')").fetchall()
        return ("group_key",) in columns

    def spool_names(self) -> set[str]:
        """Spool names of the files whose spooled copy may still exist."""
        rows = self._db.execute("SELECT spool_name FROM files WHERE disposed=0").fetchall()
        return {str(name) for (name,) in rows}

    def claiming(self) -> list[FileRow]:
        return self._files(f"state='{FileState.CLAIMING}'")

    def received(self) -> list[FileRow]:
        """Claimed files not yet in a sealed batch, oldest first."""
        return self._files(f"state='{FileState.RECEIVED}' ORDER BY received_at, id")

    def publishers_of(self, pipeline: str, hashes: Sequence[str]) -> dict[str, str]:
        """sha256 → the batch that already published that content in this pipeline."""
        found: dict[str, str] = {}
        for start in range(0, len(hashes), _IN_CHUNK):
            chunk = set(hashes[start : start + _IN_CHUNK])
            prefixes = list({sha[:SHA_KEY_CHARS] for sha in chunk})
            rows = self._db.execute(
                # By content, not by state: published rows are most of the table. The index
                # holds the hashes' prefixes; the whole hash is compared here.
                "SELECT sha256, batch_id FROM files INDEXED BY files_by_sha WHERE pipeline=? AND "
                f"substr(sha256, 1, {SHA_KEY_CHARS}) IN ({','.join('?' * len(prefixes))}) "
                f"AND state='{FileState.PUBLISHED}'",
                (pipeline, *prefixes),
            )
            for sha256, batch_id in rows:
                if sha256 in chunk:
                    found.setdefault(str(sha256), str(batch_id))
        return found

    def unfinished_batches(self) -> list[BatchRow]:
        rows = self._db.execute(
            "SELECT id, pipeline, priority, state, opened_at, sealed_at, attempts, folder "
            f"FROM batches WHERE state IN ('{BatchState.SEALED}', '{BatchState.RUNNING}') ORDER "
            "BY sealed_at"
        ).fetchall()
        return [BatchRow(*row) for row in rows]

    def batch_files(self, batch_id: str) -> list[FileRow]:
        return self._files("batch_id=? ORDER BY id", (batch_id,))

    def undisposed(self, skip: Container[int] = (), batch_id: str | None = None) -> list[FileRow]:
        """Terminal files whose spooled copy has not been archived, quarantined or deleted (of
        one batch, with `batch_id`), but those in `skip` (renames already under way: no row
        built for them)."""
        where = f"disposed=0 AND state IN ({_TERMINAL}) ORDER BY id"
        if batch_id is None:
            return self._files(where, skip=skip)
        # `+disposed`: by the batch's index, not the one of every file not yet disposed of.
        return self._files(f"batch_id=? AND +{where}", (batch_id,), skip=skip)

    def meta(self, key: str) -> Any:
        row = self._db.execute("SELECT value FROM meta WHERE key=?", (key,)).fetchone()
        return None if row is None else json.loads(row[0])

    @contextmanager
    def snapshot(self) -> Iterator[None]:
        """One read transaction: the queries inside see one state (a WAL reader never blocks)."""
        self._db.execute("BEGIN DEFERRED")
        try:
            yield
        finally:
            self._db.execute("COMMIT")

    def file_counts(self, since: float | None = None) -> dict[tuple[str, str], int]:
        """Files per (pipeline, state); with `since`, only those finished at or after it."""
        where, params = ("WHERE done_at >= ?", (since,)) if since is not None else ("", ())
        rows = self._db.execute(
            f"SELECT pipeline, state, count(*) FROM files {where} GROUP BY pipeline, state",
            params,
        ).fetchall()
        return {(p, s): int(n) for p, s, n in rows}

    def batch_counts(self, since: float | None = None) -> dict[tuple[str, str], int]:
        """Batches per (pipeline, state); with `since`, only those finished at or after it."""
        where, params = ("WHERE finished_at >= ?", (since,)) if since is not None else ("", ())
        rows = self._db.execute(
            f"SELECT pipeline, state, count(*) FROM batches {where} GROUP BY pipeline, state",
            params,
        ).fetchall()
        return {(p, s): int(n) for p, s, n in rows}

    def open_files(self) -> dict[str, tuple[int, float]]:
        """Per pipeline: files received but in no sealed batch yet (count, oldest arrival)."""
        rows = self._db.execute(
            "SELECT pipeline, count(*), min(received_at) FROM files WHERE "
            f"state='{FileState.RECEIVED}' "
            "GROUP BY pipeline"
        ).fetchall()
        return {p: (int(n), float(t)) for p, n, t in rows}

    def waiting_batches(self) -> dict[tuple[str, int], int]:
        """Sealed batches waiting for a worker, per (pipeline, priority)."""
        rows = self._db.execute(
            f"SELECT pipeline, priority, count(*) FROM batches WHERE state='{BatchState.SEALED}' "
            "GROUP BY pipeline, priority"
        ).fetchall()
        return {(p, int(prio)): int(n) for p, prio, n in rows}

    def unfinished_count(self) -> int:
        """Files not yet published, quarantined or skipped as duplicates."""
        (count,) = self._db.execute(
            f"SELECT count(*) FROM files WHERE state NOT IN ({_TERMINAL})"
        ).fetchone()
        return int(count)

    def oldest_waiting(self) -> dict[str, float]:
        rows = self._db.execute(
            "SELECT pipeline, min(received_at) FROM files "
            f"WHERE state IN ('{FileState.RECEIVED}', '{FileState.BATCHED}') GROUP BY pipeline"
        ).fetchall()
        return {p: float(t) for p, t in rows}

    def find_files(self, key: str) -> list[FileRow]:
        """Files whose sha256, name or spool name is `key`."""
        return self._files("sha256=? OR name=? OR spool_name=? ORDER BY id", (key, key, key))

    def batch(self, batch_id: str) -> BatchRow | None:
        row = self._db.execute(
            "SELECT id, pipeline, priority, state, opened_at, sealed_at, attempts, folder "
            "FROM batches WHERE id=?",
            (batch_id,),
        ).fetchone()
        return None if row is None else BatchRow(*row)

    def files_changed_since(self, since: float) -> list[dict[str, Any]]:
        """Files received or finished at or after `since` (to rebuild missing audit lines)."""
        return self._dicts(
            "SELECT id, pipeline, name, sha256, size, received_at, state, batch_id, reason, "
            "done_at FROM files WHERE received_at >= ? OR done_at >= ? ORDER BY id",
            (since, since),
        )

    def batches_changed_since(self, since: float) -> list[dict[str, Any]]:
        """Batches sealed, started or finished at or after `since`."""
        group_key = (
            "(SELECT max(group_key) FROM files f WHERE f.batch_id=b.id)"
            if self._has_group_key()
            else "NULL"
        )
        return self._dicts(
            "SELECT id, pipeline, priority, state, sealed_at, started_at, finished_at, n_files, "
            "n_bytes, "
            f"folder, reason, attempts, {group_key} AS group_key, "
            "(SELECT count(*) FROM files f WHERE f.batch_id=b.id AND "
            f"f.state='{FileState.PUBLISHED}') "
            "AS n_published, "
            "(SELECT count(*) FROM files f WHERE f.batch_id=b.id AND "
            f"f.state='{FileState.QUARANTINED}') "
            "AS n_quarantined "
            "FROM batches b WHERE sealed_at >= ? OR started_at >= ? OR finished_at >= ?",
            (since, since, since),
        )

    def _dicts(self, sql: str, params: tuple[Any, ...]) -> list[dict[str, Any]]:
        cursor = self._db.execute(sql, params)
        names = [d[0] for d in cursor.description]
        return [dict(zip(names, row, strict=True)) for row in cursor.fetchall()]

    def finished_before(
        self,
        pipeline: str,
        states: tuple[str, ...],
        before: float,
        *,
        copy_kept: bool,
        limit: int | None = None,
    ) -> list[tuple[FileRow, Facts]]:
        """Disposed terminal files of `pipeline` in `states` finished before `before`, oldest
        first, with their facts; `copy_kept`: only those whose kept copy was not pruned yet."""
        marks = ",".join("?" for _ in states)
        kept = "AND json_extract(facts, '$.pruned_at') IS NULL " if copy_kept else ""
        cursor = self._db.execute(
            "SELECT id, pipeline, name, spool_name, sha256, size, received_at, state, batch_id, "
            f"reason, facts FROM files WHERE pipeline=? AND state IN ({marks}) AND disposed=1 "
            f"AND done_at < ? {kept}AND state IN ({_TERMINAL}) ORDER BY done_at, id LIMIT ?",
            (pipeline, *states, before, -1 if limit is None else limit),
        )
        return [
            (FileRow(*row[:10]), {} if row[10] is None else dict(json.loads(row[10])))
            for row in cursor.fetchall()
        ]

    def requeued_incarnation(self, pipeline: str, sha256: str, after_id: int) -> int | None:
        """The first row after `after_id` with this content not yet linked to a requeue."""
        row = self._db.execute(
            "SELECT id FROM files WHERE pipeline=? AND sha256=? AND id>? "
            "AND json_extract(facts, '$.requeue_of') IS NULL ORDER BY id LIMIT 1",
            (pipeline, sha256, after_id),
        ).fetchone()
        return None if row is None else int(row[0])

    def quarantined_files(self) -> list[tuple[FileRow, Facts]]:
        """Every quarantined input not requeued yet, with its facts."""
        rows = self._db.execute(
            "SELECT id, pipeline, name, spool_name, sha256, size, received_at, state, batch_id, "
            f"reason, facts FROM files WHERE state='{FileState.QUARANTINED}' AND disposed=1 "
            "AND json_extract(facts, '$.requeued_to') IS NULL ORDER BY id"
        ).fetchall()
        return [(FileRow(*r[:10]), {} if r[10] is None else dict(json.loads(r[10]))) for r in rows]

    def file_facts(self, file_id: int) -> Facts:
        row = self._db.execute("SELECT facts FROM files WHERE id=?", (file_id,)).fetchone()
        return {} if row is None or row[0] is None else dict(json.loads(row[0]))

    def _files(
        self, where: str, params: tuple[Any, ...] = (), skip: Container[int] = ()
    ) -> list[FileRow]:
        # A read-only look at a journal that no service of this version migrated yet has none.
        group_key = "group_key" if self._has_group_key() else "NULL"
        rows = self._db.execute(
            "SELECT id, pipeline, name, spool_name, sha256, size, received_at, state, batch_id, "
            f"reason, {group_key} FROM files WHERE {where}",
            params,
        ).fetchall()
        return [FileRow(*row) for row in rows if row[0] not in skip]

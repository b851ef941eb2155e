"""Journal: SQLite (WAL; FULL sync unless a commit says not) holding every file and batch.

The service's main loop is its only writer; one method per state transition, each an explicit
IMMEDIATE transaction. Reads live in `journal_queries` (which `status` and `trace` open read-only).

Group commit: a transition that nothing outside the journal acts on (a claim's outcome, a
seal, a disposal) commits without an fsync; it survives a crash of the process at once, and a
power cut from the next durable commit (or fdatasync of the WAL) on. Every transition that
something outside acts on is durable before it does, most made durable by whoever acts on them,
off the main loop, with an fdatasync of the WAL: the claimer before it moves a chunk's files
(their intent rows), a local worker before it publishes (the batch's seal and running mark; for
a remote worker they are committed durably), the archiver before it archives or deletes
published inputs. The audit log syncs the journal (`sync`) before its own lines are made
durable, so that it never holds a line the journal could lose.
"""

from __future__ import annotations

import json
import os
import sqlite3
from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager
from importlib.resources import files as package_files
from pathlib import Path
from typing import Any

from daemon.errors import JournalCorruptError
from daemon.fsutil import sync_file
from daemon.journal_checkpoint import Checkpointer
from daemon.journal_queries import BatchRow, FileRow, JournalQueries
from daemon.models import TERMINAL_FILE_STATES, Batch, BatchResult, BatchState, FileState, Reason

__all__ = ["BatchRow", "FileRow", "Journal", "JournalQueries"]

SCHEMA_VERSION = 3
# Steps from an older version to the next (a fresh journal gets schema.sql whole).
_MIGRATIONS = {
    1: "ALTER TABLE files ADD COLUMN group_key TEXT;",
    2: "DROP INDEX IF EXISTS files_by_sha;\n"
    "CREATE INDEX files_by_sha ON files (pipeline, substr(sha256, 1, 16));",
}
_TERMINAL = ",".join(f"'{s}'" for s in TERMINAL_FILE_STATES)


class Journal(JournalQueries):
    def __init__(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        if not path.exists():
            # Created private, never for a moment with the umask's mode.
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
            os.fchmod(fd, 0o600)
            os.close(fd)
        super().__init__(path, sqlite3.connect(path, isolation_level=None, timeout=30.0))
        # The commits are durable once this file is (WAL mode): `sync_file` it from anywhere.
        self.wal_path = f"{path}-wal"
        _check_integrity(self._db, path)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA wal_autocheckpoint=0")  # the checkpointer's thread does them
        self._checkpointer = Checkpointer(path, self.wal_path)
        self._db.execute("PRAGMA synchronous=FULL")
        self._is_full = True  # the connection's setting: changed only when a commit needs other
        self._is_synced = True
        self._db.execute("PRAGMA foreign_keys=ON")
        _migrate(self._db, path)

    @contextmanager
    def transaction(self, *, durable: bool = True) -> Iterator[sqlite3.Connection]:
        """`durable=False`: committed without an fsync (see the module's group commit)."""
        if self._is_full != durable:  # set before each commit that needs the other setting
            self._db.execute(f"PRAGMA synchronous={'FULL' if durable else 'NORMAL'}")
            self._is_full = durable
        self._db.execute("BEGIN IMMEDIATE")
        try:
            yield self._db
        except BaseException:
            self._db.execute("ROLLBACK")
            raise
        self._db.execute("COMMIT")
        self._is_synced = durable
        self._checkpointer.committed()

    def close(self) -> None:
        """Stop the checkpoints' thread, then close (SQLite checkpoints what is left)."""
        self._checkpointer.close()
        super().close()

    @property
    def is_synced(self) -> bool:
        """Every commit so far is durable (the last one was)."""
        return self._is_synced

    def sync(self) -> None:
        """Make every commit durable: one fdatasync of the WAL, none if the last commit was."""
        if not self._is_synced:
            sync_file(self.wal_path)
            self._is_synced = True

    def begin_claims(
        self, claims: Iterable[tuple[str, str, str, float]], *, durable: bool = True
    ) -> list[int]:
        """Record intent to move (pipeline, name, spool_name, received_at) into the spool; the
        new rows' ids in the order given (one statement: the rows are read back by their
        spool name, unique and written only here under the write lock). `durable=False`: the
        claimer syncs the WAL before it moves anything."""
        rows = [(p, n, s, r) for p, n, s, r in claims]
        if not rows:
            return []
        with self.transaction(durable=durable) as db:
            (last,) = db.execute("SELECT coalesce(max(id), 0) FROM files").fetchone()
            db.executemany(
                "INSERT INTO files (pipeline, name, spool_name, received_at, state) "
                f"VALUES (?, ?, ?, ?, '{FileState.CLAIMING}')",
                rows,
            )
            ids = dict(db.execute("SELECT spool_name, id FROM files WHERE id > ?", (last,)))
        return [int(ids[spool_name]) for _, _, spool_name, _ in rows]

    def finish_claims(
        self,
        received: Iterable[tuple[int, str, int]],
        dropped: Iterable[int] = (),
        quarantined: Iterable[tuple[int, str, int, str]] = (),
        groups: Mapping[int, str] | None = None,
    ) -> None:
        """Claims that landed (id, sha256, size), vanished (id), or were refused (…, reason);
        `groups`: the batch group of landed files of a `batch_by` pipeline."""
        quarantined = list(quarantined)
        # Refused ones are moved to the quarantine next: durable first. The rest, no fsync.
        with self.transaction(durable=bool(quarantined)) as db:
            db.executemany(
                f"UPDATE files SET state='{FileState.RECEIVED}', sha256=?, size=? WHERE id=?",
                [(sha, size, fid) for fid, sha, size in received],
            )
            if groups:
                db.executemany(
                    "UPDATE files SET group_key=? WHERE id=?", [(g, i) for i, g in groups.items()]
                )
            db.executemany("DELETE FROM files WHERE id=?", [(fid,) for fid in dropped])
            db.executemany(
                f"UPDATE files SET state='{FileState.QUARANTINED}', sha256=?, size=?, reason=?, "
                "done_at="
                "received_at WHERE id=?",
                [(sha, size, reason, fid) for fid, sha, size, reason in quarantined],
            )

    def mark_duplicates(self, dupes: Iterable[tuple[int, str]]) -> None:
        """Files (id, earlier batch id) whose content that batch already published."""
        with self.transaction() as db:
            db.executemany(
                f"UPDATE files SET state='{FileState.DUPLICATE}', reason='{Reason.DUPLICATE_OF}:' "
                "|| ?, "
                "done_at=received_at WHERE id=?",
                [(batch_id, fid) for fid, batch_id in dupes],
            )

    def record_rejected(self, pipeline: str, name: str, inode: int, reason: str, at: float) -> bool:
        """Remember a refused inbox entry; False when it was reported before."""
        with self.transaction() as db:
            cur = db.execute(
                "INSERT OR IGNORE INTO rejected (pipeline, name, inode, reason, at) "
                "VALUES (?, ?, ?, ?, ?)",
                (pipeline, name, inode, reason, at),
            )
        return cur.rowcount > 0

    def seal_batch(self, batch: Batch, opened_at: float) -> None:
        # No fsync: nothing acts on a seal before its batch publishes (see `mark_running`).
        with self.transaction(durable=False) as db:
            db.execute(
                "INSERT INTO batches (id, pipeline, priority, state, opened_at, sealed_at, "
                f"n_files, n_bytes) VALUES (?, ?, ?, '{BatchState.SEALED}', ?, ?, ?, ?)",
                (
                    batch.batch_id,
                    batch.pipeline,
                    batch.priority,
                    opened_at,
                    batch.sealed_at,
                    len(batch.files),
                    batch.n_bytes,
                ),
            )
            db.executemany(
                f"UPDATE files SET state='{FileState.BATCHED}', batch_id=? WHERE id=? AND "
                f"state='{FileState.RECEIVED}'",
                [(batch.batch_id, f.file_id) for f in batch.files],
            )

    def mark_running(self, batch_id: str, at: float, *, durable: bool = True) -> int:
        """Start one more attempt; return its number. `durable=False`: the worker syncs the WAL
        before it publishes (the seal with it)."""
        with self.transaction(durable=durable) as db:
            db.execute(
                f"UPDATE batches SET state='{BatchState.RUNNING}', attempts=attempts+1, "
                "started_at=? WHERE id=?",
                (at, batch_id),
            )
            (attempts,) = db.execute(
                "SELECT attempts FROM batches WHERE id=?", (batch_id,)
            ).fetchone()
        return int(attempts)

    def mark_sealed_again(self, batch_id: str, reason: str, *, is_counted: bool = True) -> None:
        """Put a batch whose attempt failed back in line; an attempt that was not the batch's
        fault (a full disk, a stop) does not count against it."""
        with self.transaction() as db:
            db.execute(
                f"UPDATE batches SET state='{BatchState.SEALED}', reason=?, attempts=attempts-? "
                "WHERE id=?",
                (reason, 0 if is_counted else 1, batch_id),
            )

    def split_batch(self, parent_id: str, children: Iterable[Batch], reason: str) -> None:
        """Replace a batch by smaller ones (to isolate an input that kills its worker)."""
        with self.transaction() as db:
            db.execute(
                f"UPDATE batches SET state='{BatchState.SPLIT}', reason=? WHERE id=?",
                (reason, parent_id),
            )
            opened_at, priority = db.execute(
                "SELECT opened_at, priority FROM batches WHERE id=?", (parent_id,)
            ).fetchone()
            for child in children:
                db.execute(
                    "INSERT INTO batches (id, pipeline, priority, state, opened_at, sealed_at, "
                    f"n_files, n_bytes) VALUES (?, ?, ?, '{BatchState.SEALED}', ?, ?, ?, ?)",
                    (
                        child.batch_id,
                        child.pipeline,
                        priority,
                        opened_at,
                        child.sealed_at,
                        len(child.files),
                        child.n_bytes,
                    ),
                )
                db.executemany(
                    "UPDATE files SET batch_id=? WHERE id=?",
                    [(child.batch_id, f.file_id) for f in child.files],
                )

    def mark_published(self, result: BatchResult, at: float, *, durable: bool = True) -> None:
        """`durable=False`: the archiver syncs the WAL before it moves an input (a batch that
        quarantined some must stay durable: those are moved on the main loop)."""
        with self.transaction(durable=durable) as db:
            db.execute(
                f"UPDATE batches SET state='{BatchState.PUBLISHED}', finished_at=?, folder=? "
                "WHERE id=?",
                (at, str(result.folder), result.batch_id),
            )
            _finish_files(db, result, at)

    def mark_batch_quarantined(self, result: BatchResult, at: float) -> None:
        """Every input of the batch was refused by its processor: nothing to publish."""
        with self.transaction() as db:
            db.execute(
                f"UPDATE batches SET state='{BatchState.QUARANTINED}', finished_at=?, reason=? "
                "WHERE id=?",
                (at, Reason.EVERY_INPUT_QUARANTINED, result.batch_id),
            )
            _finish_files(db, result, at)

    def mark_failed(self, batch_id: str, reason: str, at: float) -> None:
        """Give up on a batch: each of its inputs goes to quarantine with `reason`."""
        with self.transaction() as db:
            db.execute(
                f"UPDATE batches SET state='{BatchState.FAILED}', finished_at=?, reason=? WHERE "
                "id=?",
                (at, reason, batch_id),
            )
            db.execute(
                f"UPDATE files SET state='{FileState.QUARANTINED}', reason=?, done_at=? "
                f"WHERE batch_id=? AND state='{FileState.BATCHED}'",
                (reason, at, batch_id),
            )

    def quarantine_received(self, file_ids: Iterable[int], reason: str, at: float) -> None:
        """Files claimed but never batched that can no longer be (their pipeline is gone)."""
        with self.transaction() as db:
            db.executemany(
                f"UPDATE files SET state='{FileState.QUARANTINED}', reason=?, done_at=? "
                f"WHERE id=? AND state='{FileState.RECEIVED}'",
                [(reason, at, fid) for fid in file_ids],
            )

    def record_quarantined_as(self, names: Iterable[tuple[int, str]]) -> None:
        """The name each quarantined input got (made safe, maybe numbered): `trace` shows it."""
        with self.transaction() as db:
            db.executemany(
                "UPDATE files SET facts=json_set(coalesce(facts, '{}'), '$.quarantined_as', ?) "
                "WHERE id=?",
                [(name, fid) for fid, name in names],
            )

    def mark_disposed(self, file_ids: Iterable[int]) -> None:
        # No fsync: lost to a power cut, recovery disposes again and finds the inputs gone.
        with self.transaction(durable=False) as db:
            db.executemany("UPDATE files SET disposed=1 WHERE id=?", [(i,) for i in file_ids])

    def mark_pruned(self, file_ids: Iterable[int], at: float) -> None:
        """Retention deleted these files' kept copies (archive or quarantine)."""
        with self.transaction() as db:
            db.executemany(
                "UPDATE files SET facts=json_set(coalesce(facts, '{}'), '$.pruned_at', ?) "
                "WHERE id=?",
                [(at, fid) for fid in file_ids],
            )

    def forget_files(self, file_ids: Iterable[int]) -> None:
        """Retention drops finished rows, then the finished batches left with no file."""
        with self.transaction() as db:
            db.executemany(
                f"DELETE FROM files WHERE id=? AND disposed=1 AND state IN ({_TERMINAL})",
                [(fid,) for fid in file_ids],
            )
            db.execute(
                "DELETE FROM batches WHERE state IN "
                f"('{BatchState.PUBLISHED}', '{BatchState.QUARANTINED}', '{BatchState.FAILED}', "
                f"'{BatchState.SPLIT}') AND NOT EXISTS "
                "(SELECT 1 FROM files f WHERE f.batch_id=batches.id)"
            )

    def link_requeue(self, old_id: int, new_id: int) -> None:
        """A quarantined input came back through the inbox as row `new_id`: link both ways."""
        with self.transaction() as db:
            db.execute(
                "UPDATE files SET facts=json_set(coalesce(facts, '{}'), '$.requeued_to', ?) "
                "WHERE id=?",
                (new_id, old_id),
            )
            db.execute(
                "UPDATE files SET facts=json_set(coalesce(facts, '{}'), '$.requeue_of', ?) "
                "WHERE id=?",
                (old_id, new_id),
            )

    def set_meta(self, **values: Any) -> None:
        with self.transaction() as db:
            db.executemany(
                "INSERT INTO meta (key, value) VALUES (?, ?) "
                "ON CONFLICT (key) DO UPDATE SET value=excluded.value",
                [(k, json.dumps(v)) for k, v in values.items()],
            )


def _check_integrity(db: sqlite3.Connection, path: Path) -> None:
    try:
        (result,) = db.execute("PRAGMA quick_check").fetchone()
    except sqlite3.DatabaseError as exc:
        raise JournalCorruptError(
            f"journal {path} is not a readable database ({exc}); refusing to start. "
            "Restore it from a backup or move it aside deliberately."
        ) from None
    if result != "ok":
        raise JournalCorruptError(
            f"journal {path} failed PRAGMA quick_check ({result}); refusing to start."
        )


def _migrate(db: sqlite3.Connection, path: Path) -> None:
    (version,) = db.execute("PRAGMA user_version").fetchone()
    if version > SCHEMA_VERSION:
        raise JournalCorruptError(
            f"journal {path} has schema version {version}, newer than this medbatch "
            f"({SCHEMA_VERSION}); upgrade medbatch"
        )
    if version < SCHEMA_VERSION:
        schema = package_files("daemon").joinpath("schema.sql").read_text(encoding="utf-8")
        if version:  # tables exist: only the steps since
            schema = "\n".join(_MIGRATIONS[v] for v in range(version, SCHEMA_VERSION))
        db.executescript(
            f"BEGIN IMMEDIATE;\n{schema}\nPRAGMA user_version={SCHEMA_VERSION};\nCOMMIT;"
        )


def _finish_files(db: sqlite3.Connection, result: BatchResult, at: float) -> None:
    db.executemany(
        f"UPDATE files SET state='{FileState.QUARANTINED}', reason=?, facts=?, done_at=? "
        "WHERE id=?",
        [
            (reason, json.dumps({"detail": detail}), at, fid)
            for fid, (reason, detail) in result.quarantined.items()
        ],
    )
    db.executemany(
        f"UPDATE files SET state='{FileState.PUBLISHED}', facts=?, done_at=? WHERE id=?",
        [(json.dumps(facts), at, fid) for fid, facts in result.facts.items()],
    )

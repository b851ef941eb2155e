"""Journal schema migrations: a version-1 journal (before `group_key`) and a version-2 one (its
content index on the whole hash) open as the current version with their rows kept, and
read-only queries work on the older ones."""

from __future__ import annotations

import sqlite3
from pathlib import Path

from daemon.journal import SCHEMA_VERSION, Journal, JournalQueries

V1_FILES = """CREATE TABLE files (
    id INTEGER PRIMARY KEY, pipeline TEXT NOT NULL, name TEXT NOT NULL,
    spool_name TEXT NOT NULL UNIQUE, sha256 TEXT, size INTEGER, received_at REAL NOT NULL,
    state TEXT NOT NULL, batch_id TEXT, reason TEXT, facts TEXT, done_at REAL,
    disposed INTEGER NOT NULL DEFAULT 0);
CREATE TABLE batches (id TEXT PRIMARY KEY, pipeline TEXT NOT NULL, priority INTEGER NOT NULL,
    state TEXT NOT NULL, opened_at REAL NOT NULL, sealed_at REAL NOT NULL,
    attempts INTEGER NOT NULL DEFAULT 0, started_at REAL, finished_at REAL,
    n_files INTEGER NOT NULL, n_bytes INTEGER NOT NULL, folder TEXT, reason TEXT);
CREATE TABLE rejected (pipeline TEXT NOT NULL, name TEXT NOT NULL, inode INTEGER NOT NULL,
    reason TEXT NOT NULL, at REAL NOT NULL, PRIMARY KEY (pipeline, name, inode));
CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
INSERT INTO files (pipeline, name, spool_name, sha256, size, received_at, state)
    VALUES ('ct', 'a.dcm', 'ct/1', 'ab', 10, 100.0, 'received');
PRAGMA user_version=1;
"""


def v1_journal(path: Path) -> None:
    db = sqlite3.connect(path)
    db.executescript(V1_FILES)
    db.close()


def test_version_1_gains_group_key_and_keeps_its_rows(tmp_path: Path) -> None:
    path = tmp_path / "journal.db"
    v1_journal(path)
    # A read-only look before any service of this version migrated it
    old = JournalQueries.open_readonly(path)
    assert [(r.name, r.group_key) for r in old.received()] == [("a.dcm", None)]
    old.close()
    journal = Journal(path)
    (version,) = journal._db.execute("PRAGMA user_version").fetchone()
    assert version == SCHEMA_VERSION == 3
    (row,) = journal.received()
    assert (row.name, row.group_key) == ("a.dcm", None)
    journal.finish_claims([(row.id, "ab", 10)], groups={row.id: "series:00ff"})
    assert [r.group_key for r in journal.received()] == ["series:00ff"]
    journal.close()
    Journal(path).close()  # opening again is a no-op


def test_a_new_journal_has_group_key(tmp_path: Path) -> None:
    journal = Journal(tmp_path / "journal.db")
    (file_id,) = journal.begin_claims([("ct", "b.dcm", "ct/2", 5.0)])
    journal.finish_claims([(file_id, "cd", 3)], groups={file_id: "unknown"})
    assert [r.group_key for r in journal.received()] == ["unknown"]
    journal.close()


def test_version_2_gets_the_prefix_index_and_still_finds_published_contents(
    tmp_path: Path,
) -> None:
    path = tmp_path / "journal.db"
    journal = Journal(path)
    (file_id,) = journal.begin_claims([("emr", "a.csv", "emr/1", 5.0)])
    journal.finish_claims([(file_id, "cd" * 32, 3)])
    journal._db.execute("UPDATE files SET state='published', batch_id='B1' WHERE id=?", (file_id,))
    # Back to version 2's schema: the index on the whole hash.
    journal._db.executescript(
        "DROP INDEX files_by_sha; CREATE INDEX files_by_sha ON files (pipeline, sha256);"
        "PRAGMA user_version=2;"
    )
    journal.close()

    journal = Journal(path)
    (version,) = journal._db.execute("PRAGMA user_version").fetchone()
    (sql,) = journal._db.execute(
        "SELECT sql FROM sqlite_master WHERE name='files_by_sha'"
    ).fetchone()
    assert version == SCHEMA_VERSION == 3
    assert "substr(sha256, 1, 16)" in sql
    assert journal.publishers_of("emr", ["cd" * 32, "ef" * 32]) == {"cd" * 32: "B1"}
    journal.close()

"""WAL checkpoints run on a thread of their own, never inside a commit of the main loop."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest

from daemon import journal_checkpoint
from daemon.journal import Journal
from tests.support.waiting import wait_until

NAME = "n" * 2000  # ~2 KB rows: a few thousand fill the WAL past its threshold


def grow(journal: Journal, rows: int, start: int = 0) -> None:
    journal.begin_claims(
        [("emr", f"{NAME}{i}", f"emr/{i}", 1.0) for i in range(start, start + rows)]
    )


def checkpoint_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name == "medbatch-journal-checkpoint"]


def test_the_main_connection_never_checkpoints(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With the thread held back, a WAL three times SQLite's own threshold is still all in the
    WAL: no commit copied a page into the database (which SQLite's default would have)."""
    monkeypatch.setattr(journal_checkpoint, "START_BYTES", 1 << 40)
    path = tmp_path / "journal.db"
    journal = Journal(path)
    size = path.stat().st_size
    for chunk in range(6):
        grow(journal, 1000, chunk * 1000)
    assert Path(journal.wal_path).stat().st_size > 3 * 1000 * 4096
    assert path.stat().st_size == size
    assert checkpoint_threads() == []
    journal.close()
    assert path.stat().st_size > size, "closing checkpointed what was left"


def test_the_thread_checkpoints_once_the_wal_is_large_and_stops_with_the_journal(
    tmp_path: Path,
) -> None:
    path = tmp_path / "journal.db"
    journal = Journal(path)
    grow(journal, 100)
    assert checkpoint_threads() == [], "a small journal never starts it"
    size = path.stat().st_size
    grow(journal, 3000, 100)
    wait_until(lambda: journal._checkpointer.done >= 1, 10, message="a checkpoint")
    assert path.stat().st_size > size, "the WAL's pages copied into the database"
    assert len(checkpoint_threads()) == 1
    assert len(journal.received()) == 0 and len(journal.claiming()) == 3100
    journal.close()
    assert checkpoint_threads() == []
    assert not Path(journal.wal_path).exists()

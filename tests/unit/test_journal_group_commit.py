"""Group commit: transitions nothing outside the journal acts on commit without an fsync; each
one something outside acts on is durable before it does, and so is everything before it."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from daemon import journal as journal_module
from daemon.audit import AuditLog, reconcile, writer
from daemon.audit.events import REBUILT_EVENTS, FileReceived, FileRejected, Record
from daemon.journal import Journal
from daemon.models import Batch, BatchResult, IncomingFile
from daemon.outcome_listeners import AuditTrail
from daemon.outcomes import Committed, GaveUp

NORMAL, FULL = 1, 2


def audit_lines(folder: Path) -> list[str]:
    return [line for path in sorted(folder.glob("audit-*.jsonl")) for line in
            path.read_text().splitlines()]  # fmt: skip


def synchronous(journal: Journal) -> int:
    return int(journal._db.execute("PRAGMA synchronous").fetchone()[0])


def claimed(journal: Journal, name: str) -> IncomingFile:
    (file_id,) = journal.begin_claims([("emr", name, f"emr/{name}", 1000.0)])
    return IncomingFile(file_id, "emr", name, f"/spool/emr/{name}", "ab" * 32, 10, 1000.0)


def test_each_transition_is_durable_exactly_when_something_outside_acts_on_it(
    tmp_path: Path,
) -> None:
    journal = Journal(tmp_path / "journal.db")
    a, b = claimed(journal, "a.csv"), claimed(journal, "b.csv")
    assert journal.is_synced  # an intent by default (recovery's adopted orphans)
    journal.begin_claims([("emr", "c.csv", "emr/c.csv", 1000.0)], durable=False)
    assert not journal.is_synced  # the main loop's: its claimer syncs before it moves them
    journal.finish_claims([(a.file_id, a.sha256, 10), (b.file_id, b.sha256, 10)])
    assert not journal.is_synced  # outcomes only: recovery redoes them from the intent
    bad = claimed(journal, "bad.csv")
    journal.finish_claims([], quarantined=[(bad.file_id, "", 0, "symlink")])
    assert journal.is_synced  # the refused file is moved to the quarantine next
    journal.seal_batch(Batch("B1", "emr", "emr", 3, 1001.0, (a, b)), 1000.0)
    assert not journal.is_synced  # nothing acts on a seal before it runs
    journal.mark_running("B1", 1002.0)
    assert journal.is_synced  # a remote worker publishes next: the seal is durable with it
    journal.mark_running("B1", 1002.5, durable=False)
    assert not journal.is_synced  # a local worker syncs the WAL before it publishes
    result = BatchResult("B1", tmp_path / "out", 1003.0, facts={a.file_id: {}, b.file_id: {}})
    journal.mark_published(result, 1003.0, durable=False)
    assert not journal.is_synced  # the archiver syncs before it moves the inputs
    journal.mark_disposed([a.file_id, b.file_id])
    assert not journal.is_synced  # lost to a power cut, disposal finds the inputs gone
    with journal.transaction(durable=False):
        assert synchronous(journal) == NORMAL
    with journal.transaction():  # every commit is durable unless it says not
        assert synchronous(journal) == FULL
    journal.close()


def test_sync_makes_the_commits_durable_once_without_a_commit(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`sync` is one fdatasync of the WAL (which holds every commit), not a commit of its own;
    none when the last commit was durable."""
    synced: list[str] = []
    real = journal_module.sync_file
    monkeypatch.setattr(journal_module, "sync_file", lambda path: (synced.append(path), real(path)))
    journal = Journal(tmp_path / "journal.db")
    journal.sync()
    assert synced == []  # nothing to sync
    a = claimed(journal, "a.csv")
    journal.finish_claims([(a.file_id, a.sha256, 10)])
    changes = journal._db.total_changes
    journal.sync()
    assert synced == [f"{tmp_path / 'journal.db'}-wal"] and journal.is_synced
    assert journal._db.total_changes == changes  # no row written to sync
    journal.sync()
    assert len(synced) == 1  # already durable
    journal.close()


def test_the_sync_setting_changes_only_between_durable_and_other_commits(tmp_path: Path) -> None:
    """A run of commits without an fsync (the main loop's every step) sets it once, not twice
    a commit."""
    journal = Journal(tmp_path / "journal.db")
    statements: list[str] = []
    journal._db.set_trace_callback(statements.append)
    for name in ("a.csv", "b.csv", "c.csv"):
        journal.begin_claims([("emr", name, f"emr/{name}", 1000.0)], durable=False)
    claimed(journal, "d.csv")
    pragmas = [s for s in statements if s.startswith("PRAGMA")]
    assert pragmas == ["PRAGMA synchronous=NORMAL", "PRAGMA synchronous=FULL"]
    journal._db.set_trace_callback(None)
    journal.close()


def test_a_failed_transaction_leaves_commits_durable_by_default(tmp_path: Path) -> None:
    journal = Journal(tmp_path / "journal.db")
    with pytest.raises(RuntimeError), journal.transaction(durable=False):
        raise RuntimeError("boom")
    with journal.transaction():
        assert synchronous(journal) == FULL
    journal.close()


def test_the_audit_log_syncs_the_journal_before_its_own_lines(tmp_path: Path) -> None:
    """The barrier runs before each fsync of the log that has lines to make durable, never
    when there is nothing new; a barrier that fails leaves the lines to the next sync."""
    audit = AuditLog(tmp_path / "_audit")
    calls: list[int] = []
    failing = [True]

    def barrier() -> None:
        calls.append(audit.head[0])
        if failing[0]:
            raise OSError("journal unwritable")

    audit.set_barrier(barrier)
    audit.sync()
    assert calls == []  # nothing new since the log opened
    audit.record(FileReceived(pipeline="emr", file="a.csv", sha256="ab" * 32, size=1, file_id=1))
    with pytest.raises(OSError):
        audit.sync()
    failing[0] = False
    audit.sync()
    assert calls == [audit.head[0], audit.head[0]]
    audit.sync()
    assert len(calls) == 2  # synced: nothing new
    audit.close()


def test_the_per_step_audit_sync_waits_for_its_oldest_line_to_age(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`sync_due` (each step of the main loop) groups a few steps' lines into one fsync, and one
    journal barrier: not at once, but as soon as the oldest unsynced line is SYNC_LAG_S old."""
    monkeypatch.setattr(writer, "SYNC_LAG_S", 0.05)
    audit = AuditLog(tmp_path / "_audit")
    barriers: list[float] = []
    audit.set_barrier(lambda: barriers.append(time.monotonic()))
    audit.sync_due()
    assert barriers == []  # nothing written: nothing to sync
    written_at = time.monotonic()
    audit.record(FileReceived(pipeline="emr", file="a.csv", sha256="ab" * 32, size=1, file_id=1))
    audit.sync_due()
    assert barriers == []  # too young: left to a later step
    deadline = time.monotonic() + 10
    while not barriers and time.monotonic() < deadline:
        audit.sync_due()
    assert len(barriers) == 1 and barriers[0] - written_at >= 0.05
    audit.sync_due()
    assert len(barriers) == 1  # synced: nothing new
    audit.close()


def test_a_line_the_journal_cannot_rebuild_is_synced_by_its_own_step(tmp_path: Path) -> None:
    """Only lines `reconcile` rebuilds wait for a later step's fsync; a rejection (or any other
    line) makes the step that wrote it sync, with the waiting lines."""
    audit = AuditLog(tmp_path / "_audit")
    barriers: list[int] = []
    audit.set_barrier(lambda: barriers.append(1))
    audit.record(FileReceived(pipeline="emr", file="a.csv", sha256="ab" * 32, size=1, file_id=1))
    audit.sync_due()
    assert barriers == []
    audit.record(FileRejected(pipeline="emr", file="b.csv", reason="symlink", size=0))
    audit.sync_due()
    assert barriers == [1]
    audit.close()


@pytest.mark.parametrize("outcome", ["published", "gave_up"])
def test_a_batchs_outcome_lines_wait_for_the_steps_sync(tmp_path: Path, outcome: str) -> None:
    """batch.published, batch.failed and file.quarantined are rebuilt from the journal: a
    batch's outcome writes them without an fsync of its own (one each batch, with the
    journal's, made a 20,000-file backlog's 40 batches 40 syncs on the main loop); the step's
    `sync_due` makes them durable with the rest."""
    audit = AuditLog(tmp_path / "_audit")
    barriers: list[int] = []
    audit.set_barrier(lambda: barriers.append(1))
    a, b = (IncomingFile(i, "emr", f"{i}.csv", f"/spool/emr/{i}.csv", "ab" * 32, 10, 1000.0)
            for i in (1, 2))  # fmt: skip
    batch = Batch("B1", "emr", "emr", 3, 1001.0, (a, b))
    if outcome == "published":
        quarantined = {b.file_id: ("unreadable", "ParserError")}
        result = BatchResult("B1", tmp_path / "out", 1003.0, facts={1: {}}, quarantined=quarantined)
        AuditTrail(audit).on_outcome(Committed(batch, result, run_s=1.0))
    else:
        AuditTrail(audit).on_outcome(GaveUp(batch, "processor_failed"))
    assert barriers == []
    written = [json.loads(line)["event"] for line in audit_lines(tmp_path / "_audit")]
    assert "file.quarantined" in written
    assert ("batch.published" if outcome == "published" else "batch.failed") in written
    deadline = time.monotonic() + 10
    while not barriers and time.monotonic() < deadline:
        audit.sync_due()
    assert barriers == [1]
    audit.close()


def test_the_lines_that_may_wait_are_exactly_those_reconcile_rebuilds() -> None:
    rebuilt = {
        value.event
        for value in vars(reconcile).values()
        if isinstance(value, type) and issubclass(value, Record) and value is not Record
    }
    assert rebuilt == REBUILT_EVENTS

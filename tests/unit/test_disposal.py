"""Disposal and `copies_of`: the path `trace` shows is where the input really went, whatever
its name (unsafe, too long, taken twice)."""

from __future__ import annotations

import json
import threading
from pathlib import Path
from typing import Any

import pytest

from daemon.audit.names import hash_name, hashed_file_name, read_name_key
from daemon.config import Settings
from daemon.disposal import Archiver, Disposal, copies_of
from daemon.fsutil import sync_file
from daemon.journal import Journal

NAMES = [
    "a.csv",
    "a.csv",  # the same name again: numbered
    "-rf.csv",
    "bad\nname\x1b[31m.csv",
    "é" * 150 + ".csv",  # past the safe length
    "caf\\xe9.csv",  # bytes that were not UTF-8, as the journal records them
    "..",
]


def settings(root: Path, after_publish: str = "archive", hash_names: bool = True) -> Settings:
    return Settings.model_validate(
        {
            "paths": {"inbox": root / "inbox", "outbox": root / "outbox",
                      "state": root / "state", "quarantine": root / "quarantine"},
            "pipeline": [{"name": "emr", "kind": "emr", "after_publish": after_publish,
                          "hash_names": hash_names}],
        }
    )  # fmt: skip


@pytest.fixture
def journal(tmp_path: Path) -> Journal:
    (tmp_path / "state" / "spool").mkdir(parents=True)
    return Journal(tmp_path / "state" / "journal.db")


def test_trace_finds_each_quarantined_input_where_it_went(tmp_path: Path, journal: Journal) -> None:
    """Every quarantined name (a family of awkward ones) is found at the path copies_of gives,
    with its sidecar beside it."""
    s = settings(tmp_path)
    claims = [("emr", name, f"s{i}.csv", 100.0 + i) for i, name in enumerate(NAMES)]
    ids = journal.begin_claims(claims)
    for _, _, spool_name, _ in claims:
        (s.paths.spool / spool_name).write_bytes(b"x")
    journal.finish_claims([], quarantined=[(i, "", 0, "fifo") for i in ids])
    pipelines = {p.name: p for p in s.pipeline}

    assert Disposal(s.paths, journal, lambda: pipelines).dispose() == len(NAMES)

    rows = [journal._files("id=?", (i,))[0] for i in ids]
    key = read_name_key(s.paths.state)
    assert key is not None
    paths = []
    for row in rows:
        ((what, where),) = copies_of(s.paths, pipelines, row, journal.file_facts(row.id))
        assert what == "quarantined copy"
        assert where.is_file(), where
        # Hashed by default: the file is named by the keyed hash, the sidecar holds the hash.
        assert where.name.startswith(hashed_file_name(key, row.name))  # `.1` if taken
        sidecar = json.loads(where.with_name(where.name + ".error.json").read_text())
        assert sidecar["name"] == hash_name(key, row.name)
        paths.append(where)
    assert len(set(paths)) == len(NAMES)


def test_published_inputs_are_archived_or_deleted_as_configured(
    tmp_path: Path, journal: Journal
) -> None:
    """Archived: the copy is at the archive path; deleted: copies_of says there is none."""
    for after, expected in (("archive", True), ("delete", False)):
        s = settings(tmp_path, after)
        (file_id,) = journal.begin_claims([("emr", "x.csv", f"{after}.csv", 100.0)])
        (s.paths.spool / f"{after}.csv").write_bytes(b"x")
        journal.finish_claims([(file_id, "0" * 64, 1)])
        journal._db.execute("UPDATE files SET state='published', done_at=1 WHERE id=?", (file_id,))
        pipelines = {p.name: p for p in s.pipeline}
        Disposal(s.paths, journal, lambda p=pipelines: p).dispose()
        (row,) = journal._files("id=?", (file_id,))
        copies = copies_of(s.paths, pipelines, row, {})
        assert bool(copies) == expected
        assert all(where.is_file() for _, where in copies)
        assert not (s.paths.spool / f"{after}.csv").exists()


LOOK_ALIKES = ["x.error.json", "y.csv.error.json", "z.ERROR.JSON", "w.error.json.1", ".error.json"]


@pytest.mark.parametrize("hash_names", [True, False])
def test_producer_files_named_like_sidecars_are_never_taken_for_one(
    tmp_path: Path, journal: Journal, hash_names: bool
) -> None:
    """Inputs named `*.error.json`: every `*.error.json` in the quarantine is a real sidecar,
    exactly one per input, and each input is found (by trace's copies_of) beside its own."""
    s = settings(tmp_path, hash_names=hash_names)
    claims = [("emr", name, f"s{i}.csv", 100.0 + i) for i, name in enumerate(LOOK_ALIKES)]
    ids = journal.begin_claims(claims)
    for _, _, spool_name, _ in claims:
        (s.paths.spool / spool_name).write_bytes(b"x")
    journal.finish_claims([], quarantined=[(i, "", 0, "fifo") for i in ids])
    pipelines = {p.name: p for p in s.pipeline}
    assert Disposal(s.paths, journal, lambda: pipelines).dispose() == len(LOOK_ALIKES)

    folder = s.paths.quarantine / "emr"
    sidecars = [p for p in folder.iterdir() if p.name.endswith(".error.json")]
    assert len(sidecars) == len(LOOK_ALIKES)
    assert all(json.loads(p.read_text())["reason"] == "fifo" for p in sidecars)
    for file_id in ids:
        (row,) = journal._files("id=?", (file_id,))
        ((_, where),) = copies_of(s.paths, pipelines, row, journal.file_facts(file_id))
        assert where.read_bytes() == b"x" and not where.name.endswith(".error.json")
        assert where.with_name(where.name + ".error.json") in sidecars


def _published(journal: Journal, s: Settings, names: list[str]) -> list[int]:
    ids = journal.begin_claims([("emr", n, n, 100.0) for n in names])
    for n in names:
        (s.paths.spool / n).write_bytes(n.encode())
    journal.finish_claims([(i, "0" * 64, 1) for i in ids])
    journal._db.executemany(
        "UPDATE files SET state='published', done_at=1 WHERE id=?", [(i,) for i in ids]
    )
    return ids


def _undisposed(journal: Journal) -> set[int]:
    return {r.id for r in journal.undisposed()}


def test_the_archiver_thread_renames_and_the_main_loop_marks(
    tmp_path: Path, journal: Journal
) -> None:
    """With an archiver, dispose() hands the renames to its thread: the rows stay undisposed
    (and are not handed over twice) until collect() marks what the thread moved. A day folder
    that cannot be made keeps every input in the spool; the next disposal moves them."""
    s = settings(tmp_path)
    pipelines = {p.name: p for p in s.pipeline}
    woken = threading.Event()
    archiver = Archiver(woken.set)
    disposal = Disposal(s.paths, journal, lambda: pipelines, archiver)
    blocker = s.paths.archive / "emr"
    blocker.parent.mkdir(parents=True)
    blocker.write_bytes(b"")  # a file where the pipeline's archive folder goes
    ids = _published(journal, s, ["a.csv", "b.csv"])

    assert disposal.dispose() == 2
    assert woken.wait(10)
    assert disposal.dispose() == 0, "rows handed over are not handed over again"
    assert disposal.collect() == 0 and _undisposed(journal) == set(ids)
    assert (s.paths.spool / "a.csv").is_file(), "kept in the spool"

    blocker.unlink()
    woken.clear()
    assert disposal.dispose() == 2 and woken.wait(10)
    assert disposal.collect() == 2 and _undisposed(journal) == set()
    rows = [journal._files("id=?", (i,))[0] for i in ids]
    assert [copies_of(s.paths, pipelines, r, {})[0][1].read_bytes() for r in rows] == [
        b"a.csv",
        b"b.csv",
    ]
    assert not any((s.paths.spool / n).exists() for n in ("a.csv", "b.csv"))
    disposal.close()


def test_close_waits_for_the_handed_renames_and_marks_them(
    tmp_path: Path, journal: Journal
) -> None:
    """Stop: whatever the archiver was given is archived and marked before the journal closes."""
    s = settings(tmp_path)
    pipelines = {p.name: p for p in s.pipeline}
    disposal = Disposal(s.paths, journal, lambda: pipelines, Archiver(lambda: None))
    names = [f"f{i}.csv" for i in range(300)]
    _published(journal, s, names)
    assert disposal.dispose() == len(names)
    disposal.close()
    assert _undisposed(journal) == set()
    assert not any((s.paths.spool / n).exists() for n in names)


def test_deletions_run_on_the_archiver_thread_and_a_refused_one_is_kept(
    tmp_path: Path, journal: Journal
) -> None:
    """`after_publish = "delete"`: the inputs are deleted on the archiver's thread (inline,
    20,000 deletions stalled the main loop for seconds), marked by collect(); one the file
    system refuses to delete (EISDIR: a folder where it should be) stays undisposed, and goes
    once it can."""
    s = settings(tmp_path, "delete")
    pipelines = {p.name: p for p in s.pipeline}
    woken = threading.Event()
    disposal = Disposal(s.paths, journal, lambda: pipelines, Archiver(woken.set))
    ids = _published(journal, s, ["a.csv", "b.csv"])
    stuck = s.paths.spool / "b.csv"
    stuck.unlink()
    stuck.mkdir()

    assert disposal.dispose() == 2 and woken.wait(10)
    assert disposal.collect() == 1 and _undisposed(journal) == {ids[1]}
    assert not (s.paths.spool / "a.csv").exists() and stuck.is_dir()

    stuck.rmdir()
    stuck.write_bytes(b"b")
    woken.clear()
    assert disposal.dispose() == 1 and woken.wait(10)
    assert disposal.collect() == 1 and _undisposed(journal) == set()
    assert not stuck.exists()
    (row,) = journal._files("id=?", (ids[0],))
    assert copies_of(s.paths, pipelines, row, {}) == []
    disposal.close()


def test_the_archiver_makes_the_journal_durable_before_it_moves_an_input(
    tmp_path: Path, journal: Journal
) -> None:
    """Published marks are committed without an fsync: the archiver syncs the journal first;
    when that fails, it moves nothing (the inputs wait in the spool, undisposed)."""
    s = settings(tmp_path)
    pipelines = {p.name: p for p in s.pipeline}
    seen: list[list[str]] = []
    failing = [True]

    def sync() -> None:
        seen.append(sorted(p.name for p in s.paths.spool.iterdir()))
        if failing[0]:
            raise OSError(5, "journal unsyncable")
        sync_file(journal.wal_path)

    woken = threading.Event()
    disposal = Disposal(s.paths, journal, lambda: pipelines, Archiver(woken.set, sync))
    ids = _published(journal, s, ["a.csv", "b.csv"])

    assert disposal.dispose() == 2 and woken.wait(10)
    assert disposal.collect() == 0 and _undisposed(journal) == set(ids)
    assert seen == [["a.csv", "b.csv"]]

    failing[0] = False
    woken.clear()
    assert disposal.dispose() == 2 and woken.wait(10)
    assert disposal.collect() == 2 and _undisposed(journal) == set()
    assert seen[1] == ["a.csv", "b.csv"], "synced before the first rename"
    assert list(s.paths.spool.iterdir()) == []
    disposal.close()


def test_a_batch_outcome_disposes_of_its_own_inputs_only(tmp_path: Path, journal: Journal) -> None:
    """`dispose(batch_id)` looks up the batch's files by its index, not every file not yet
    disposed of (thousands in flight during a backlog); a full `dispose()` takes the rest."""
    s = settings(tmp_path)
    pipelines = {p.name: p for p in s.pipeline}
    disposal = Disposal(s.paths, journal, lambda: pipelines)
    ids = _published(journal, s, ["a.csv", "b.csv", "c.csv"])
    journal._db.executemany(
        "UPDATE files SET batch_id=? WHERE id=?", [("B1", ids[0]), ("B1", ids[1]), ("B2", ids[2])]
    )
    in_flight = journal.begin_claims([("emr", "d.csv", "d.csv", 100.0)])
    sql: list[str] = []
    journal._db.set_trace_callback(sql.append)

    assert disposal.dispose("B1") == 2
    assert _undisposed(journal) == {ids[2]}
    assert not (s.paths.spool / "a.csv").exists() and (s.paths.spool / "c.csv").is_file()
    plans = [
        journal._db.execute(f"EXPLAIN QUERY PLAN {q}").fetchall()  # its values filled in
        for q in sql
        if q.startswith("SELECT") and "batch_id=" in q
    ]
    journal._db.set_trace_callback(None)
    assert plans and all("files_by_batch" in str(p) for p in plans), plans
    assert disposal.dispose("B3") == 0
    assert disposal.dispose() == 1 and _undisposed(journal) == set()
    assert journal._files("id=?", (in_flight[0],))[0].state == "claiming"


def test_the_archiver_hands_lots_to_its_remote_and_waits_for_them_at_close(
    tmp_path: Path, journal: Journal
) -> None:
    """A remote that takes the lot does the moves (its reply comes from another thread, and
    `close` waits for it); one that refuses (no claimer ready) leaves them to the thread."""
    s = settings(tmp_path)
    pipelines = {p.name: p for p in s.pipeline}
    woken = threading.Event()
    taken: list[tuple[list[Any], list[str]]] = []
    accepting = [False]

    def remote(moves: list[Any], folders: list[str], reply: Any) -> bool:
        if not accepting[0]:
            return False
        taken.append((moves, folders))
        threading.Timer(0.2, reply, args=([m[0] for m in moves],)).start()
        return True

    archiver = Archiver(woken.set, remote=remote)
    disposal = Disposal(s.paths, journal, lambda: pipelines, archiver)
    ids = _published(journal, s, ["a.csv", "b.csv", "c.csv"])
    journal._db.executemany("UPDATE files SET batch_id=? WHERE id=?", [("B1", ids[0])])

    assert disposal.dispose("B1") == 1 and woken.wait(10)  # refused: the thread moved it
    assert taken == [] and not (s.paths.spool / "a.csv").exists()
    assert disposal.collect() == 1

    accepting[0] = True
    assert disposal.dispose() == 2
    ((moves, folders),) = taken
    assert [m[0] for m in moves] == ids[1:] and len(folders) == 1
    disposal.close()  # waits for the remote's reply, then marks the lot
    assert _undisposed(journal) == set()
    assert (s.paths.spool / "b.csv").exists(), "handed over, and not moved here as well"

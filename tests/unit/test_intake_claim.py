"""Intake's claim on real files: real causes, the read lease, service-owned copies, the refusal
memory and event-first ordering (a real journal and audit log, an injected clock)."""

from __future__ import annotations

import errno
import hashlib
import os
import stat
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from daemon.intake import claim
from daemon.intake import intake as intake_module
from tests.unit.test_intake import GOOD, Env

FOREIGN_UID = 4242


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock() -> Clock:
    return Clock()


def make_env(root: Path, clock: Clock, **pipeline: Any) -> Env:
    env = Env(root, **pipeline)
    env.intake._monotonic = clock
    return env


@pytest.fixture
def env(tmp_path: Path, clock: Clock) -> Iterator[Env]:
    made = make_env(tmp_path, clock)
    yield made
    made.close()


@pytest.fixture
def slow(tmp_path: Path, clock: Clock) -> Iterator[Env]:
    """A pipeline that waits 30 s for a file nobody says is complete."""
    env = make_env(tmp_path, clock, settle_s=30)
    yield env
    env.close()


def rejected(env: Env) -> list[tuple[str, str]]:
    return [(a["file"], a["reason"]) for a in env.audit_lines() if a["event"] == "file.rejected"]


def test_a_renamed_in_file_nobody_writes_is_taken_at_once(slow: Env) -> None:
    """A close or rename-in event and a lease granted: no settle wait."""
    (slow.inbox / "a.csv").write_bytes(GOOD)
    slow.intake.offer("emr", slow.inbox / "a.csv", is_writing=False)
    (taken,) = slow.intake.take_settled()
    assert taken.sha256 == hashlib.sha256(GOOD).hexdigest()


def test_no_lease_outlives_the_claim(slow: Env) -> None:
    """The read lease ends with the claim's descriptor: another process may open the spooled
    file for writing at once (under a lease its open would wait out lease-break-time)."""
    (slow.inbox / "a.csv").write_bytes(GOOD)
    slow.intake.offer("emr", slow.inbox / "a.csv", is_writing=False)
    (taken,) = slow.intake.take_settled()
    opener = "import os, sys; os.close(os.open(sys.argv[1], os.O_WRONLY | os.O_NONBLOCK))"
    done = subprocess.run([sys.executable, "-c", opener, str(taken.spool_path)], timeout=30)
    assert done.returncode == 0


def test_a_file_seen_without_a_close_waits_for_settle(slow: Env, clock: Clock) -> None:
    """Created or modified, no close seen: taken only after settle_s of no change."""
    (slow.inbox / "a.csv").write_bytes(GOOD)
    slow.intake.offer("emr", slow.inbox / "a.csv")
    assert slow.intake.take_settled() == []
    assert slow.intake.next_due(is_paused=False) == pytest.approx(clock.now + 30)
    clock.now += 30
    (taken,) = slow.intake.take_settled()
    assert taken.size == len(GOOD)


def test_no_due_time_while_paused_or_while_the_claimer_holds_all_it_may(env: Env) -> None:
    """A due backlog gives the main loop no time to wake at while intake is paused or the
    claimer holds `CHUNKS_HELD` chunks: the loop waits for a message instead of spinning."""
    for i in range(3 * 2):
        (env.inbox / f"{i}.csv").write_bytes(GOOD)
        env.intake.offer("emr", env.inbox / f"{i}.csv", is_writing=False)
    now = env.intake._monotonic()
    assert env.intake.next_due(is_paused=False) == pytest.approx(now)
    assert env.intake.next_due(is_paused=True) is None
    for _ in range(intake_module.CHUNKS_HELD):
        env.intake.send_settled(limit=2)
    assert env.intake.next_due(is_paused=False) is None  # full: its finished chunk wakes us
    assert len(env.intake.collect()) == 2 * intake_module.CHUNKS_HELD
    assert env.intake.next_due(is_paused=False) == pytest.approx(now)


@pytest.mark.parametrize("how", ["append", "truncate", "rewrite"])
def test_a_file_held_open_for_writing_is_not_taken_until_closed(slow: Env, how: str) -> None:
    """A writer renames its upload in and keeps the descriptor: the lease is refused, so the
    file waits; once closed, what is hashed is what the writer left."""
    path = slow.inbox / "a.csv"
    with path.open("wb") as writer:
        writer.write(GOOD)
        writer.flush()
        slow.intake.offer("emr", path, is_writing=False)
        assert slow.intake.take_settled() == [] and path.exists()
        if how == "append":
            writer.write(b"copd,2\n")
        elif how == "truncate":
            writer.truncate(5)
        else:
            writer.seek(0)
            writer.write(b"DIAGNOSIS")
    final = path.read_bytes()
    slow.intake.offer("emr", path, is_writing=False)
    (taken,) = slow.intake.take_settled()
    assert (taken.sha256, taken.size) == (hashlib.sha256(final).hexdigest(), len(final))
    assert Path(taken.spool_path).read_bytes() == final


def test_a_foreign_or_linked_file_is_replaced_by_a_private_copy(
    tmp_path: Path, clock: Clock
) -> None:
    """Owned by another user, or with a second name: the spool keeps a service-owned 0600 copy,
    so writes, truncation or chmod through the producer's other name change nothing kept."""
    env = make_env(tmp_path, clock, allow_hard_links=True)
    try:
        (env.inbox / "theirs.csv").write_bytes(GOOD)
        os.chown(env.inbox / "theirs.csv", FOREIGN_UID, FOREIGN_UID)
        (env.inbox / "theirs.csv").chmod(0o666)
        other_name = tmp_path / "kept-by-producer.csv"
        other_name.write_bytes(GOOD)
        os.link(other_name, env.inbox / "linked.csv")
        taken = env.take("theirs.csv", "linked.csv")
        assert {t.name for t in taken} == {"theirs.csv", "linked.csv"}
        with other_name.open("r+b") as fh:
            fh.write(b"XXXX")
            fh.truncate(3)
        other_name.chmod(0o666)
        for t in taken:
            st = os.lstat(t.spool_path)
            assert (st.st_uid, stat.S_IMODE(st.st_mode), st.st_nlink) == (os.geteuid(), 0o600, 1)
            assert Path(t.spool_path).read_bytes() == GOOD
            assert t.sha256 == hashlib.sha256(GOOD).hexdigest()
        assert not [p for p in (tmp_path / "state" / "spool" / "emr").iterdir() if p.name[0] == "."]
    finally:
        env.close()


def test_a_file_that_changes_while_read_is_changed_after_check(
    tmp_path: Path, clock: Clock, monkeypatch: pytest.MonkeyPatch
) -> None:
    """No lease to be had (no CAP_LEASE): a writer appends during the hash; the bytes read are
    not what was checked, so the file is quarantined as changed_after_check."""
    env = make_env(tmp_path, clock)
    try:
        path = env.inbox / "a.csv"
        path.write_bytes(GOOD)
        real_hash = claim._hash_fd
        monkeypatch.setattr(claim, "try_lease", lambda fd: claim.Lease.UNAVAILABLE)

        def appending_hash(fd: int, *args: Any) -> Any:
            with open(f"/proc/self/fd/{fd}", "ab") as producer:
                producer.write(b"copd,2\n")
            return real_hash(fd, *args)

        monkeypatch.setattr(claim, "_hash_fd", appending_hash)
        assert env.take("a.csv") == []
        assert env.files() == [("a.csv", "quarantined", "changed_after_check", 1)]
    finally:
        env.close()


def test_an_entry_that_vanishes_before_the_claim_is_not_reported(
    env: Env, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Gone between the listing and the rename (ENOENT): no claim, no rejection, not counted."""
    (env.inbox / "a.csv").write_bytes(GOOD)
    real_rename = os.rename

    def vanishing_rename(src: Any, dst: Any, **kwargs: Any) -> None:
        os.unlink(env.inbox / "a.csv")
        real_rename(src, dst, **kwargs)

    monkeypatch.setattr(os, "rename", vanishing_rename)
    assert env.take("a.csv") == []
    monkeypatch.undo()
    assert rejected(env) == [] and env.intake.left_in_inbox == 0 and env.intake.pending == 0
    assert env.files() == []  # the claim's intent is dropped


@pytest.mark.parametrize("code", [errno.EACCES, errno.EPERM])
def test_an_unreadable_file_is_permission_denied_left_and_counted(
    env: Env, monkeypatch: pytest.MonkeyPatch, code: int
) -> None:
    """Opening the checked inode is refused: permission_denied (never symlink), left in the
    inbox, reported once however often it is seen, and counted until it goes."""
    (env.inbox / "a.csv").write_bytes(GOOD)
    real_open = os.open

    def refusing_open(path: Any, flags: int, *args: Any, **kwargs: Any) -> int:
        if str(path).startswith("/proc/self/fd/"):
            raise PermissionError(code, "denied")
        return real_open(path, flags, *args, **kwargs)

    monkeypatch.setattr(os, "open", refusing_open)
    for _ in range(3):
        assert env.take("a.csv") == []
        env.intake.scan()
        assert env.intake.take_settled() == []
    monkeypatch.undo()
    assert rejected(env) == [("a.csv", "permission_denied")]
    assert (env.inbox / "a.csv").exists() and env.files() == []
    assert env.intake.left_in_inbox == 1
    (env.inbox / "a.csv").unlink()
    env.intake.scan()
    assert env.intake.left_in_inbox == 0


def test_refused_entries_are_not_examined_again_until_they_change(env: Env) -> None:
    """A flood of links is refused by the scan that finds it (waiting cannot make a link a
    file), once; an entry that changes (a link replaced by a file of that name) is examined
    again."""
    for i in range(300):
        os.symlink("/etc/passwd", env.inbox / f"l{i}.csv")
    assert env.intake.scan() == 0
    assert env.intake.take_settled() == []
    assert env.intake.left_in_inbox == 300 and env.intake.pending == 0
    assert env.intake.scan() == 0
    (env.inbox / "l7.csv").unlink()
    (env.inbox / "l7.csv").write_bytes(GOOD)
    assert env.intake.scan() == 1
    (taken,) = env.intake.take_settled()
    assert taken.name == "l7.csv" and env.intake.left_in_inbox == 299
    assert len(rejected(env)) == 300


def test_a_file_announced_by_an_event_goes_before_a_rescan_backlog(env: Env) -> None:
    """A rescan finds 50 files; then an event announces one more: it is in the first claim."""
    for i in range(50):
        (env.inbox / f"old{i}.csv").write_bytes(GOOD)
    env.intake.scan()
    (env.inbox / "new.csv").write_bytes(GOOD + b"new,1\n")
    env.intake.offer("emr", env.inbox / "new.csv", is_writing=False)
    (first,) = env.intake.take_settled(limit=1)
    assert first.name == "new.csv"


def test_a_rescan_holds_at_most_max_pending_candidates(
    env: Env, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A producer's flood of files costs bounded memory: a capped rescan keeps `pending` above
    zero (a `run --once` does not stop early) and lists the rest once the backlog drains."""
    monkeypatch.setattr(intake_module, "MAX_PENDING", 10)
    for i in range(25):
        (env.inbox / f"f{i:02d}.csv").write_bytes(GOOD)
    assert env.intake.scan() == 10 and env.intake.pending == 11
    taken = []
    for _ in range(10):
        taken += env.intake.take_settled(limit=10)
    assert sorted(t.name for t in taken) == [f"f{i:02d}.csv" for i in range(25)]
    assert env.intake.pending == 0


def test_recovery_replaces_a_foreign_spooled_file_by_a_private_copy(env: Env) -> None:
    """A crash after the rename but before the copy: recovery copies, hashes and keeps a
    service-owned 0600 file; a half-made copy left by the crash is removed, not adopted."""
    spool = env.root / "state" / "spool" / "emr"
    (spool / "1-a.csv").write_bytes(GOOD)
    os.chown(spool / "1-a.csv", FOREIGN_UID, FOREIGN_UID)
    (spool / ".2-b.csv.copy").write_bytes(GOOD[:5])
    env.journal.begin_claims([("emr", "a.csv", "emr/1-a.csv", 0.0)])
    assert env.intake.adopt_orphans() == 0
    (taken,) = env.intake.finish_interrupted_claims()
    st = os.lstat(spool / "1-a.csv")
    assert (st.st_uid, stat.S_IMODE(st.st_mode)) == (os.geteuid(), 0o600)
    assert taken.sha256 == hashlib.sha256(GOOD).hexdigest()
    assert sorted(p.name for p in spool.iterdir()) == ["1-a.csv"]


def test_a_pass_cut_short_by_the_cap_goes_on_where_it_stopped(
    env: Env, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A backlog larger than the cap is listed once in all, not again from the top each time
    the candidates drain: every entry is visited once, and refused entries are kept or
    forgotten only when the pass has seen the whole folder."""
    monkeypatch.setattr(intake_module, "MAX_PENDING", 10)
    for i in range(25):
        (env.inbox / f"f{i:02d}.csv").write_bytes(GOOD)
    os.symlink("/etc/passwd", env.inbox / "link.csv")
    visited: list[str] = []
    visit = intake_module.Intake._scan_entry

    def counting(
        self: intake_module.Intake, pipeline: Any, entry: os.DirEntry[str], **kw: Any
    ) -> None:
        visited.append(entry.name)
        visit(self, pipeline, entry, **kw)

    monkeypatch.setattr(intake_module.Intake, "_scan_entry", counting)
    env.intake.scan()
    taken = []
    while env.intake.pending:
        taken += env.intake.take_settled(limit=7)  # goes on with the pass as the backlog drains

    assert sorted(t.name for t in taken) == [f"f{i:02d}.csv" for i in range(25)]
    assert sorted(visited) == sorted([*(f"f{i:02d}.csv" for i in range(25)), "link.csv"])
    assert rejected(env) == [("link.csv", "symlink")] and env.intake.left_in_inbox == 1
    # a full pass after the link is gone forgets it
    (env.inbox / "link.csv").unlink()
    env.intake.scan()
    assert env.intake.left_in_inbox == 0


def test_with_no_settle_time_the_claim_alone_judges_what_became_of_a_candidate(
    env: Env, tmp_path: Path
) -> None:
    """settle_s = 0: no lstat before the claim. A candidate removed since it was offered is
    dropped quietly; one replaced by a FIFO or a link is refused by the claim's own check on
    the pinned entry; one rewritten since is taken as it is now (hashed after the move)."""
    for name in ("gone.csv", "fifo.csv", "link.csv", "rewritten.csv"):
        (env.inbox / name).write_bytes(GOOD)
        env.intake.offer("emr", env.inbox / name)
    (env.inbox / "gone.csv").unlink()
    (env.inbox / "fifo.csv").unlink()
    os.mkfifo(env.inbox / "fifo.csv")
    (env.inbox / "link.csv").unlink()
    (env.inbox / "link.csv").symlink_to(tmp_path / "elsewhere.csv")
    rewritten = GOOD + b"copd,2\n"
    (env.inbox / "rewritten.csv").write_bytes(rewritten)
    taken = env.intake.take_settled()
    assert [(f.name, f.size) for f in taken] == [("rewritten.csv", len(rewritten))]
    assert sorted(rejected(env)) == [("fifo.csv", "fifo"), ("link.csv", "symlink")]
    assert env.intake.pending == 0
    assert [row[:2] for row in env.files()] == [("rewritten.csv", "received")]


def test_with_no_settle_time_a_scan_reports_what_is_not_a_file_at_once(
    env: Env, tmp_path: Path
) -> None:
    """settle_s = 0: the listing's file type stands in for an lstat. A FIFO, a link and a
    folder are refused by the scan itself (never candidates); a plain file is taken."""
    (env.inbox / "a.csv").write_bytes(GOOD)
    os.mkfifo(env.inbox / "fifo.csv")
    (env.inbox / "link.csv").symlink_to(tmp_path / "elsewhere.csv")
    (env.inbox / "folder.csv").mkdir()
    assert env.intake.scan() == 1
    assert sorted(rejected(env)) == [
        ("fifo.csv", "fifo"),
        ("folder.csv", "directory"),
        ("link.csv", "symlink"),
    ]
    assert [f.name for f in env.intake.take_settled()] == ["a.csv"]
    assert env.intake.scan() == 0  # refused entries are not looked at again, nor reported
    assert len(rejected(env)) == 3

"""Intake on real files, a real journal and audit log: what is taken, what is refused, and what
happens when the entry changes between the check and the claim."""

from __future__ import annotations

import errno
import hashlib
import json
import os
import stat
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from daemon import fsutil
from daemon.audit import AuditLog
from daemon.config import Settings
from daemon.intake import claim
from daemon.intake.intake import Intake
from daemon.intake.refusal import recorded_name, refusal
from daemon.journal import Journal

GOOD = b"diagnosis,age\nflu,1\n"


class Env:
    def __init__(self, root: Path, **pipeline: Any) -> None:
        self.root = root
        self.settings = Settings.model_validate(
            {
                "paths": {
                    "inbox": root / "inbox",
                    "outbox": root / "outbox",
                    "state": root / "state",
                    "quarantine": root / "quarantine",
                },
                # Quarantined copies are read here by their names (the name policy, hashed
                # names, has tests of its own: tests/security/test_name_policy.py).
                "pipeline": [
                    {"name": "emr", "kind": "emr", "settle_s": 0, "hash_names": False, **pipeline}
                ],
            }
        )
        self.inbox = root / "inbox" / "emr"
        self.inbox.mkdir(parents=True)
        self.journal = Journal(root / "state" / "journal.db")
        self.audit = AuditLog(root / "outbox" / "_audit")
        self.intake = Intake(self.settings, self.journal, self.audit)

    def take(self, *names: str) -> list[Any]:
        for name in names:
            self.intake.offer("emr", self.inbox / name)
        return self.intake.take_settled()

    def audit_lines(self) -> list[dict[str, Any]]:
        self.audit.sync()
        lines = []
        for path in sorted((self.root / "outbox" / "_audit").glob("*.jsonl")):
            lines += [json.loads(line) for line in path.read_text().splitlines()]
        return lines

    def files(self) -> list[tuple[Any, ...]]:
        return self.journal._db.execute(
            "SELECT name, state, reason, disposed FROM files ORDER BY id"
        ).fetchall()

    def close(self) -> None:
        self.audit.close()
        self.journal.close()


@pytest.fixture
def env(tmp_path: Path) -> Iterator[Env]:
    made = Env(tmp_path)
    yield made
    made.close()


@pytest.fixture
def secret(tmp_path: Path) -> Path:
    path = tmp_path / "secret.csv"
    path.write_bytes(b"diagnosis,age\nSECRET,1\n")
    path.chmod(0o600)
    return path


def test_recorded_name_escapes_bytes_that_are_not_utf8() -> None:
    """Invalid UTF-8 (surrogate-escaped by Python) becomes a literal \\xNN; text stays text."""
    assert recorded_name(os.fsdecode(b"bad\xff.csv")) == "bad\\xff.csv"
    assert recorded_name("a\nb é.csv") == "a\nb é.csv"


def test_a_regular_file_is_claimed_hashed_and_made_private(env: Env) -> None:
    """A plain file moves to the spool, 0600 whatever its mode was, with one file.received."""
    (env.inbox / "a.csv").write_bytes(GOOD)
    (env.inbox / "a.csv").chmod(0o666)
    (taken,) = env.take("a.csv")
    assert taken.name == "a.csv" and taken.size == len(GOOD)
    assert stat.S_IMODE(os.stat(taken.spool_path).st_mode) == 0o600
    assert not (env.inbox / "a.csv").exists()
    assert [line["event"] for line in env.audit_lines()][-1] == "file.received"


def test_a_name_that_is_not_utf8_is_claimed_not_fatal(env: Env) -> None:
    """The journal cannot hold surrogates: the recorded name is used (this used to crash)."""
    with open(os.fsencode(env.inbox) + b"/bad\xff.csv", "wb") as fh:
        fh.write(GOOD)
    (taken,) = env.take(os.fsdecode(b"bad\xff.csv"))
    assert taken.name == "bad\\xff.csv"
    assert env.files() == [("bad\\xff.csv", "received", None, 0)]


@pytest.mark.parametrize(
    ("make", "reason"),
    [
        (lambda p, s: p.symlink_to(s), "symlink"),
        (lambda p, s: p.mkdir(), "directory"),
        (lambda p, s: os.mkfifo(p), "fifo"),
        (lambda p, s: os.mknod(p, stat.S_IFSOCK | 0o600), "socket"),
        (lambda p, s: os.link(s, p), "hard_link"),
    ],
    ids=["symlink", "directory", "fifo", "socket", "hard_link"],
)
def test_what_is_not_a_plain_file_is_rejected_once_and_left_alone(
    env: Env, secret: Path, make: Callable[[Path, Path], None], reason: str
) -> None:
    """Each is reported once (a rescan does not repeat it) and stays where it is."""
    target = env.inbox / "x.csv"
    make(target, secret)
    assert env.take("x.csv") == []
    assert env.take("x.csv") == []
    rejected = [line for line in env.audit_lines() if line["event"] == "file.rejected"]
    assert [(r["file"], r["reason"]) for r in rejected] == [("x.csv", reason)]
    assert os.path.lexists(target) and env.files() == []
    assert stat.S_IMODE(secret.stat().st_mode) == 0o600


def test_owner_and_hard_link_policies_are_per_pipeline(tmp_path: Path, secret: Path) -> None:
    """allowed_uids refuses other owners; allow_hard_links takes a linked file, leaving the
    mode of its other name alone."""
    env = Env(tmp_path, allowed_uids=[os.getuid()], allow_hard_links=True)
    try:
        (env.inbox / "theirs.csv").write_bytes(GOOD)
        os.chown(env.inbox / "theirs.csv", 4242, 4242)
        os.link(secret, env.inbox / "linked.csv")
        (taken,) = env.take("theirs.csv", "linked.csv")
        assert taken.name == "linked.csv"
        assert stat.S_IMODE(secret.stat().st_mode) == 0o600
        reasons = [line.get("reason") for line in env.audit_lines()]
        assert "owner_not_allowed" in reasons
    finally:
        env.close()


def test_refusal_checks_size_against_the_pipeline(env: Env, tmp_path: Path) -> None:
    pipeline = env.settings.pipeline[0].model_copy(update={"max_file_bytes": 3})
    (tmp_path / "big").write_bytes(b"1234")
    assert refusal(pipeline, os.lstat(tmp_path / "big")) == "too_large"


@pytest.mark.parametrize(
    ("swap", "reason", "check"),
    [
        (lambda p, s: p.symlink_to(s), "symlink", os.path.islink),
        (
            lambda p, s: os.mkfifo(p),
            "changed_after_check",
            lambda p: stat.S_ISFIFO(os.lstat(p).st_mode),
        ),
        (lambda p, s: os.link(s, p), "changed_after_check", os.path.isfile),
    ],
    ids=["symlink", "fifo", "hard_link"],
)
def test_an_entry_swapped_in_before_the_claim_is_quarantined_never_read(
    env: Env,
    secret: Path,
    monkeypatch: pytest.MonkeyPatch,
    swap: Callable[[Path, Path], None],
    reason: str,
    check: Callable[[Path], bool],
) -> None:
    """A plain file pinned and checked, then replaced just before the rename: what was moved
    is not the checked inode, so it is refused (a link as `symlink`, anything else as
    `changed_after_check`), never read or blocked on, quarantined as it is, audited once."""
    (env.inbox / "a.csv").write_bytes(GOOD)
    real_rename = os.rename
    swapped = []

    def swapping_rename(src: Any, dst: Any, **kwargs: Any) -> None:
        if not swapped:  # the claim; later renames (into quarantine) are left alone
            os.unlink(env.inbox / "a.csv")
            swap(env.inbox / "a.csv", secret)
            swapped.append(True)
        real_rename(src, dst, **kwargs)

    monkeypatch.setattr(os, "rename", swapping_rename)
    assert env.take("a.csv") == []
    monkeypatch.undo()

    quarantined = env.root / "quarantine" / "emr" / "a.csv"
    assert check(quarantined)
    sidecar = json.loads((env.root / "quarantine" / "emr" / "a.csv.error.json").read_text())
    assert (sidecar["name"], sidecar["reason"]) == ("a.csv", reason)
    assert env.files() == [("a.csv", "quarantined", reason, 1)]
    (line,) = [line for line in env.audit_lines() if line["event"] == "file.quarantined"]
    assert (line["file"], line["reason"], line["pipeline"]) == ("a.csv", reason, "emr")
    assert stat.S_IMODE(secret.stat().st_mode) == 0o600
    assert not list((env.root / "state" / "spool" / "emr").iterdir())


def test_a_failed_rename_is_rejected_once_and_the_file_left(
    env: Env, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A claim the kernel refuses (EXDEV, EPERM) leaves the file where it was, reported once."""
    (env.inbox / "a.csv").write_bytes(GOOD)

    def failing_rename(src: Any, dst: Any, **kwargs: Any) -> None:
        raise OSError(errno.EXDEV, "cross-device", str(dst))

    monkeypatch.setattr(os, "rename", failing_rename)
    assert env.take("a.csv") == []
    assert env.take("a.csv") == []
    monkeypatch.undo()
    assert (env.inbox / "a.csv").exists() and env.files() == []
    reasons = [line["reason"] for line in env.audit_lines() if line["event"] == "file.rejected"]
    assert reasons == ["claim_failed"]


def test_an_inbox_replaced_by_a_link_is_never_claimed_from(env: Env, tmp_path: Path) -> None:
    """<inbox>/<pipeline> swapped for a link to another folder: nothing is moved out of it."""
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (elsewhere / "journal.db").write_bytes(GOOD)
    env.inbox.rename(tmp_path / "old-inbox")
    env.inbox.symlink_to(elsewhere, target_is_directory=True)
    assert env.take("journal.db") == []
    assert (elsewhere / "journal.db").exists() and env.files() == []


def test_recovery_quarantines_a_spooled_link(env: Env, secret: Path) -> None:
    """A claim interrupted by a crash whose spooled entry is a link: quarantined, never read."""
    env.journal.begin_claims([("emr", "a.csv", "emr/1-a.csv", 0.0)])
    (env.root / "state" / "spool" / "emr" / "1-a.csv").symlink_to(secret)
    assert env.intake.finish_interrupted_claims() == []
    assert env.files() == [("a.csv", "quarantined", "symlink", 1)]
    assert (env.root / "quarantine" / "emr" / "a.csv").is_symlink()


@pytest.mark.parametrize("expected", [None, 10, 3 << 20])
def test_hashing_stops_past_the_size_limit(tmp_path: Path, expected: int | None) -> None:
    """A file still growing is never read past max_file_bytes + 1 chunk, whatever size its
    stat gave (the buffer is sized from it)."""
    path = tmp_path / "big"
    path.write_bytes(b"x" * (3 << 20))
    fd = os.open(path, os.O_RDONLY)
    try:
        assert claim._hash_fd(fd, 1 << 20, None, expected) == "too_large"
        assert os.lseek(fd, 0, os.SEEK_CUR) <= (1 << 20) + fsutil.READ_BYTES
    finally:
        os.close(fd)


@pytest.mark.parametrize("expected", [None, 0, 5, 1 << 16, 1 << 21])
def test_hashing_reads_the_whole_file_whatever_size_was_expected(
    tmp_path: Path, expected: int | None
) -> None:
    """The expected size only sizes the buffer: a file that grew since is hashed whole."""
    data = os.urandom((1 << 20) + 12345)
    path = tmp_path / "grown"
    path.write_bytes(data)
    fd = os.open(path, os.O_RDONLY)
    try:
        taken = claim._hash_fd(fd, 1 << 30, None, expected)
    finally:
        os.close(fd)
    assert taken == claim.Taken(hashlib.sha256(data).hexdigest(), len(data))

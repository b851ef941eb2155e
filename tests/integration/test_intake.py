"""Real watchdog, real journal, real audit log, in one process: events → settle → claim."""

from __future__ import annotations

import os
import queue
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from daemon.audit import AuditLog, read_lines
from daemon.config import Settings, load_settings
from daemon.intake.intake import Intake
from daemon.journal import Journal
from daemon.models import IncomingFile
from daemon.watcher import InboxWatcher, PathSeen
from tests.support.waiting import wait_until


@pytest.fixture
def settings(tmp_path: Path) -> Settings:
    config = tmp_path / "medbatch.toml"
    config.write_text(
        '[paths]\ninbox = "inbox"\noutbox = "outbox"\nstate = "state"\nquarantine = "q"\n'
        '[[pipeline]]\nname = "emr"\nkind = "emr"\nsettle_s = 0.2\nmax_file_bytes = 1000\n'
    )
    settings = load_settings(config)
    (settings.paths.inbox / "emr").mkdir(parents=True)
    return settings


@pytest.fixture
def parts(settings: Settings) -> Iterator[tuple[Intake, InboxWatcher, queue.SimpleQueue[object]]]:
    journal = Journal(settings.paths.journal)
    audit = AuditLog(settings.paths.audit)
    messages: queue.SimpleQueue[object] = queue.SimpleQueue()
    watcher = InboxWatcher(messages)
    watcher.start({"emr": settings.paths.inbox / "emr"})
    yield Intake(settings, journal, audit), watcher, messages
    watcher.stop()
    audit.close()
    journal.close()


def pump(
    intake: Intake, messages: queue.SimpleQueue[object], until: int, timeout_s: float = 10
) -> list[IncomingFile]:
    """Run the main loop's intake part until `until` files were claimed."""
    taken: list[IncomingFile] = []
    deadline = time.monotonic() + timeout_s
    while len(taken) < until:
        assert time.monotonic() < deadline, f"claimed {len(taken)} of {until}"
        try:
            message = messages.get(timeout=0.05)
            assert isinstance(message, PathSeen)
            intake.offer(message.pipeline, message.path, is_writing=message.is_writing)
        except queue.Empty:
            pass
        taken += intake.take_settled()
    return taken


def test_a_renamed_in_file_is_claimed_into_the_spool(settings: Settings, parts) -> None:
    """write-then-rename → one claimed file: moved to the spool, hashed, journaled, audited."""
    intake, _, messages = parts
    inbox = settings.paths.inbox / "emr"
    (inbox / ".a.csv.part").write_text("diagnosis,age\nx,1\n")
    os.rename(inbox / ".a.csv.part", inbox / "a.csv")

    (claimed,) = pump(intake, messages, 1)

    assert claimed.name == "a.csv" and claimed.size == 18
    assert Path(claimed.spool_path).read_text() == "diagnosis,age\nx,1\n"
    assert not (inbox / "a.csv").exists()
    events = [line["event"] for line in read_lines(settings.paths.audit)]
    assert events == ["file.received"]


def test_a_file_still_growing_is_not_taken(settings: Settings, parts) -> None:
    """A file written in several steps is taken only after it stops changing and is closed."""
    intake, _, messages = parts
    path = settings.paths.inbox / "emr" / "slow.csv"
    with path.open("w") as fh:
        for i in range(5):
            fh.write(f"row{i}\n")
            fh.flush()
            deadline = time.monotonic() + 0.1
            while time.monotonic() < deadline:  # the writer is busy; intake runs meanwhile
                try:
                    m = messages.get(timeout=0.01)
                    assert isinstance(m, PathSeen)
                    intake.offer(m.pipeline, m.path, is_writing=m.is_writing)
                except queue.Empty:
                    pass
                assert intake.take_settled() == []
    (claimed,) = pump(intake, messages, 1)
    assert claimed.size == len("".join(f"row{i}\n" for i in range(5)))


def test_symlink_fifo_and_oversized_file_are_refused_once(settings: Settings, parts) -> None:
    """Non-regular entries and files over max_file_bytes are reported once and left alone."""
    intake, _, messages = parts
    inbox = settings.paths.inbox / "emr"
    (inbox / "link.csv").symlink_to("/etc/passwd")
    os.mkfifo(inbox / "pipe.csv")
    (inbox / "big.csv").write_bytes(b"x" * 2000)
    (inbox / "ok.csv").write_text("fine\n")

    (claimed,) = pump(intake, messages, 1)
    intake.scan()  # a rescan sees them again: still one report each
    deadline = time.monotonic() + 1
    while time.monotonic() < deadline:
        assert intake.take_settled() == []

    assert claimed.name == "ok.csv"
    rejected = sorted(
        (line["file"], line["reason"])
        for line in read_lines(settings.paths.audit)
        if line["event"] == "file.rejected"
    )
    assert rejected == [("big.csv", "too_large"), ("link.csv", "symlink"), ("pipe.csv", "fifo")]
    assert (inbox / "link.csv").is_symlink() and (inbox / "big.csv").exists()


def test_the_watcher_reports_itself_dead_when_its_folder_goes(settings: Settings, parts) -> None:
    """Deleting a watched folder ends its emitter; is_alive says so, restart re-arms it."""
    intake, watcher, messages = parts
    folder = settings.paths.inbox / "emr"
    folder.rmdir()
    wait_until(lambda: not watcher.is_alive(), 10, message="the watcher to notice")
    watcher.restart()
    (folder / "after.csv").write_text("x\n")
    (claimed,) = pump(intake, messages, 1)
    assert claimed.name == "after.csv"


def test_a_complete_file_needs_no_settle_wait(tmp_path: Path) -> None:
    """settle_s = 30: a file renamed in with no writer left (the lease says so) is claimed at
    once from its inotify event; one renamed in while its writer holds it is claimed when the
    writer closes it; one written in place, even closed, still waits for settle_s."""
    config = tmp_path / "medbatch.toml"
    config.write_text(
        '[paths]\ninbox = "inbox"\noutbox = "outbox"\nstate = "state"\nquarantine = "q"\n'
        '[[pipeline]]\nname = "emr"\nkind = "emr"\nsettle_s = 30\n'
    )
    settings = load_settings(config)
    inbox = settings.paths.inbox / "emr"
    inbox.mkdir(parents=True)
    journal, audit = Journal(settings.paths.journal), AuditLog(settings.paths.audit)
    messages: queue.SimpleQueue[object] = queue.SimpleQueue()
    watcher = InboxWatcher(messages)
    watcher.start({"emr": inbox})
    try:
        intake = Intake(settings, journal, audit)
        (inbox / "in-place.csv").write_text("diagnosis,age\ny,2\n")
        (inbox / ".a.csv.part").write_text("diagnosis,age\nx,1\n")
        os.rename(inbox / ".a.csv.part", inbox / "a.csv")
        with (inbox / ".held.csv.part").open("w") as writer:
            writer.write("diagnosis,age\n")
            writer.flush()
            os.rename(inbox / ".held.csv.part", inbox / "held.csv")
            (claimed,) = pump(intake, messages, 1, timeout_s=5)
            assert claimed.name == "a.csv"
            assert (inbox / "held.csv").exists()
            writer.write("z,3\n")
        (late,) = pump(intake, messages, 1, timeout_s=5)
        assert (late.name, late.size) == ("held.csv", 18)
        assert (inbox / "in-place.csv").exists() and intake.pending == 1
    finally:
        watcher.stop()
        audit.close()
        journal.close()

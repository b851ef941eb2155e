"""Item 1: filesystem objects and hostile names in an inbox, through the real service.

Links, special files, folders, foreign owners and hostile names are never followed, opened or
used to build a path; each is reported once, as escaped JSON; the service keeps publishing.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import random
import signal
import stat
import threading
import time
from pathlib import Path

from daemon.audit.names import hashed_file_name
from tests.security.corpus import (
    drop_bytes,
    emr_pipeline,
    events,
    good_emr,
    leaks,
    mode_of,
    published_names,
    quarantine_reasons,
    rejected,
)
from tests.support.accounting import check_accounting
from tests.support.waiting import wait_until
from tests.system.conftest import MakeService

SECRET = "SECRET-CANARY-7f3a"
GARBAGE = b"\x00\x01\x02garbage\xff" * 20
RACE_NAMES = 8


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def test_links_special_files_and_folders_are_rejected_never_opened(
    make_service: MakeService,
) -> None:
    """Symlinks (to /etc/passwd, to the journal, to a folder), a folder, a hard link, a FIFO, a
    socket, a device, a foreign-owned and an oversized file are each reported once as
    file.rejected and left alone, their targets untouched; an inbox folder swapped for a link
    is refused; the service keeps publishing, also after a reload rescans them."""
    service = make_service(
        [
            emr_pipeline(max_file_bytes=1500, allowed_uids=[0]),
            emr_pipeline("links", allow_hard_links=True),
            emr_pipeline("moved"),
        ],
        service={"tick_s": 0.1, "rescan_s": 0.5},
    )
    # Given: an inbox holding every kind of object but a plain file
    inbox = service.inbox / "emr"
    inbox.mkdir(parents=True)
    secret = service.root / "secret.csv"
    secret.write_text(f"diagnosis,age\n{SECRET},1\n" * 12)
    secret.chmod(0o600)
    # Its mode only: a parallel test may add a user (the content is then another's change).
    passwd_mode = mode_of(Path("/etc/passwd"))
    (inbox / "passwd.csv").symlink_to("/etc/passwd")
    (inbox / "journal.csv").symlink_to(service.root / "state" / "journal.db")
    (inbox / "etc").symlink_to("/etc", target_is_directory=True)
    (inbox / "subdir").mkdir()
    (inbox / "subdir" / "inner.csv").write_bytes(good_emr(9))
    os.link(secret, inbox / "hardlink.csv")
    os.mkfifo(inbox / "pipe.csv")
    os.mknod(inbox / "sock.csv", stat.S_IFSOCK | 0o600)
    os.mknod(inbox / "null.csv", stat.S_IFCHR | 0o600, os.makedev(1, 3))
    (inbox / "foreign.csv").write_bytes(good_emr(8))
    os.chown(inbox / "foreign.csv", 4242, 4242)
    (inbox / "huge.csv").write_bytes(b"diagnosis,age\n" + b"flu,1\n" * 500)
    shared = service.root / "shared.csv"
    shared.write_bytes(good_emr(7))
    shared.chmod(0o600)
    (service.inbox / "links").mkdir(parents=True)
    os.link(shared, service.inbox / "links" / "shared.csv")
    elsewhere = service.root / "elsewhere"
    elsewhere.mkdir()
    (elsewhere / "secret2.csv").write_text(f"diagnosis,age\n{SECRET},2\n" * 12)

    # When: the service runs, a good file arrives, the "moved" inbox becomes a link, and a
    # reload rescans every inbox
    service.start()
    dropped = {"good.csv": service.drop("emr", "good.csv", good_emr(1))}
    os.rename(service.inbox / "moved", service.root / "moved-away")
    (service.inbox / "moved").symlink_to(elsewhere, target_is_directory=True)
    wait_until(lambda: published_names(service) == {"good.csv", "shared.csv"}, 30)
    wait_until(lambda: any(e["event"] == "intake.inbox_unsafe" for e in service.logs()), 15)
    service.signal(signal.SIGHUP)
    wait_until(lambda: events(service, "config.reloaded"), 15)
    dropped["after.csv"] = service.drop("emr", "after.csv", good_emr(2))
    wait_until(lambda: "after.csv" in published_names(service), 30)
    assert service.stop() == 0

    # Then: one file.rejected line per object, with its reason, and nothing else refused
    assert rejected(service) == {
        "passwd.csv": ["symlink"],
        "journal.csv": ["symlink"],
        "etc": ["symlink"],
        "subdir": ["directory"],
        "hardlink.csv": ["hard_link"],
        "pipe.csv": ["fifo"],
        "sock.csv": ["socket"],
        "null.csv": ["device"],
        "foreign.csv": ["owner_not_allowed"],
        "huge.csv": ["too_large"],
    }
    assert not events(service, "file.quarantined")
    # left alone: still what they were, where they were
    assert (inbox / "passwd.csv").is_symlink() and (inbox / "etc").is_symlink()
    assert stat.S_ISFIFO(os.lstat(inbox / "pipe.csv").st_mode)
    assert stat.S_ISCHR(os.lstat(inbox / "null.csv").st_mode)
    assert (inbox / "subdir" / "inner.csv").exists() and (elsewhere / "secret2.csv").exists()
    # targets never opened for change: contents and modes as they were
    assert mode_of(Path("/etc/passwd")) == passwd_mode
    assert mode_of(service.root / "state" / "journal.db") == 0o600
    assert mode_of(secret) == 0o600
    # an allowed hard link is published, and its other name keeps its own mode
    assert mode_of(shared) == 0o600
    assert not leaks(service, [SECRET, "root:x:0:0"])
    dropped["shared.csv"] = sha(shared.read_bytes())
    check_accounting(service, dropped)


HOSTILE_NAMES: dict[bytes, bytes] = {
    # name as the kernel holds it → content
    b"a\nb.csv": good_emr(11),
    b"\x1b[31mred\x1b[0m.csv": good_emr(12),
    b"bad\xff\xfe.csv": good_emr(13),
    b"-rf.csv": good_emr(14),
    b"\xe2\x80\xaegnp.csv": good_emr(15),
    b"L" * 251 + b".csv": GARBAGE + b"1",
    b"q\nuar\x1b]0;pwned\x07.csv": GARBAGE + b"2",
    b"-q.csv": GARBAGE + b"3",
    b"bad\xff2.csv": GARBAGE + b"4",
    b"\xe2\x80\xae-M" + b"\xc3\xa9" * 110 + b".csv": GARBAGE + b"5",
}


def recorded(name: bytes) -> str:
    return name.decode("utf-8", "backslashreplace")


def test_hostile_names_are_recorded_as_escaped_data(make_service: MakeService) -> None:
    """Names with newlines, terminal escapes, invalid UTF-8, bidi overrides, 255 bytes or a
    leading '-' are taken like any other: recorded as escaped JSON data, published or
    quarantined under a safe name; none crashes the service or reaches a log line raw."""
    service = make_service([emr_pipeline()])
    service.start()
    inbox = service.inbox / "emr"
    for name, content in HOSTILE_NAMES.items():
        drop_bytes(inbox, name, content)
    os.symlink("/etc/passwd", os.fsencode(inbox) + b"/link\n\x1b[2J.csv")

    good = {recorded(n) for n, c in HOSTILE_NAMES.items() if not c.startswith(GARBAGE)}
    bad = {recorded(n) for n, c in HOSTILE_NAMES.items() if c.startswith(GARBAGE)}
    wait_until(lambda: published_names(service) == good, 30, message="published")
    wait_until(lambda: set(quarantine_reasons(service)) == bad, 30, message="quarantined")
    assert service.process is not None and service.process.poll() is None, service.stderr()
    assert service.stop() == 0

    assert set(quarantine_reasons(service).values()) == {"not_text"}
    assert rejected(service) == {"link\n\x1b[2J.csv": ["symlink"]}
    received = {e["file"] for e in events(service, "file.received")}
    assert received == good | bad
    # The audit log is ASCII JSON: every hostile character is an escape, never a raw byte.
    for path in (service.outbox / "_audit").glob("audit-*.jsonl"):
        raw = path.read_bytes()
        assert raw.isascii()
        assert not set(raw) & (set(range(32)) - {10})
    assert b"\x1b" not in service.stderr_path.read_bytes()
    # Quarantine keeps <quarantine>/<pipeline>/<name>, made safe to create and to list.
    for entry in os.listdir(os.fsencode(service.root / "quarantine" / "emr")):
        assert len(entry) <= 255
        text = entry.decode("utf-8")
        assert text.isprintable() and not text.startswith("-"), entry
    sidecars = {q["name"] for q in service.quarantined()}
    assert sidecars == bad
    check_accounting(service, {recorded(n): sha(c) for n, c in HOSTILE_NAMES.items()})


def test_symlink_swapped_in_during_the_claim_is_never_followed(make_service: MakeService) -> None:
    """A thread keeps swapping a regular file and a symlink to a secret under one name while
    the service claims it: the secret never appears in any output; each swapped-in link is
    rejected, or quarantined as a link when it won the race; other batches keep publishing."""
    service = make_service([emr_pipeline(settle_s=0, max_files=20, max_wait=0.3)])
    secret = service.root / "secret.csv"
    secret.write_text(f"diagnosis,age\n{SECRET},1\n" * 12)
    secret.chmod(0o600)
    secret_before = secret.read_bytes()
    service.start()
    inbox = service.inbox / "emr"
    stop = threading.Event()
    swaps = {"regular": 0, "link": 0}

    def swap() -> None:
        # Eight names, so that the service tries a claim often (inotify events come in bursts
        # every half second); each name flips between a fresh regular file and a link fast
        # enough to land between the service's lstat and its rename.
        rng = random.Random(5)
        while not stop.is_set():
            for k in range(RACE_NAMES):
                n = swaps["regular"]
                (inbox / ".r.part").write_bytes(good_emr(1000 + n))
                os.replace(inbox / ".r.part", inbox / f"race{k}.csv")
                swaps["regular"] += 1
                time.sleep(rng.choice((0, 0.0005, 0.002)))
                os.symlink(secret, inbox / ".l.part")
                os.replace(inbox / ".l.part", inbox / f"race{k}.csv")
                swaps["link"] += 1

    races = {f"race{k}.csv" for k in range(RACE_NAMES)}

    def race_quarantines() -> list[object]:
        return [e["reason"] for e in events(service, "file.quarantined") if e.get("file") in races]

    swapper = threading.Thread(target=swap, name="swapper")
    swapper.start()
    try:
        steady = {}
        for i in range(6):
            steady[f"steady{i}.csv"] = service.drop("emr", f"steady{i}.csv", good_emr(i))
            wait_until(lambda i=i: f"steady{i}.csv" in published_names(service), 20)
        # The window between the pin and the rename is some microseconds: swap until a link
        # has landed in it at least once, so that the check after the rename is exercised.
        wait_until(race_quarantines, 120, 0.2, message="a link landed between pin and rename")
    finally:
        stop.set()
        swapper.join()
    for k in range(RACE_NAMES):
        # The last swap left a link, unless the service already took it (then quarantined).
        with contextlib.suppress(FileNotFoundError):
            os.unlink(inbox / f"race{k}.csv")
    wait_until(lambda: not os.listdir(inbox), 20, message="inbox empty")
    wait_until(
        lambda: (
            not service.journal(
                "SELECT count(*) FROM files WHERE state NOT IN "
                "('published', 'quarantined', 'duplicate') OR disposed=0"
            )[0][0]
        ),
        30,
        message="every claim terminal",
    )
    assert service.stop() == 0

    # Then: the secret was never read, whatever the race did
    assert not leaks(service, [SECRET])
    assert secret.read_bytes() == secret_before and mode_of(secret) == 0o600
    race_rejections = [r for name in races for r in rejected(service).get(name, [])]
    # A swap after the pin and before the rename: the moved entry is not the checked inode.
    assert set(race_rejections) <= {"symlink"}
    assert set(race_quarantines()) <= {"symlink", "changed_after_check"}
    assert race_rejections, "no swapped-in link was ever seen"
    assert race_quarantines(), "no link ever landed between the lstat and the rename"
    assert published_names(service) & races, "no regular file was ever claimed"
    assert {"steady0.csv", "steady5.csv"} <= published_names(service)
    # Every link that won the race went to quarantine as it was: a link, never a copy.
    key = (service.root / "state" / "audit-name.key").read_bytes()
    for q in service.quarantined():
        assert q["name"] in races and q["reason"] in {"symlink", "changed_after_check"}
        if q["reason"] == "symlink":
            # Kept under its hashed name (a number added when a race repeats the name).
            folder = service.root / "quarantine" / "emr"
            kept = folder.glob(hashed_file_name(key, q["name"]) + "*")
            assert any(p.is_symlink() for p in kept)
    spooled = [Path(d, f) for d, _, fs in os.walk(service.spool) for f in fs]
    assert not spooled
    published = {(i["name"], i["sha256"]) for i in service.published_inputs()}
    assert {(name, digest) for name, digest in steady.items()} <= published

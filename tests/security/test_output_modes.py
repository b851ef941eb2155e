"""Item 4: output confidentiality. Whatever the umask and the input's mode, published files are
0640 and folders 0750; every kept input (archived: intake's private copy; quarantined, with its
sidecar, which names it), the journal, the lock and the name and chain keys 0600."""

from __future__ import annotations

import os
import stat
from pathlib import Path

from daemon.outbox import publish, staging_folder
from tests.security.corpus import drop_bytes, emr_pipeline, good_emr, mode_of
from tests.support.accounting import check_accounting
from tests.support.waiting import wait_until
from tests.system.conftest import MakeService


def test_modes_never_follow_the_umask_or_the_input(make_service: MakeService) -> None:
    """With umask 0 and world-writable 0666 inputs: every folder the service makes is 0750,
    every file it publishes 0640, kept inputs, sidecars and the journal (and its WAL) 0600."""
    service = make_service([emr_pipeline()])
    inbox = service.inbox / "emr"
    old_umask = os.umask(0)
    try:
        service.start()
    finally:
        os.umask(old_umask)
    dropped = {
        "good.csv": drop_bytes(inbox, b"good.csv", good_emr(1), mode=0o666),
        "bad.csv": drop_bytes(inbox, b"bad.csv", b"\x00junk", mode=0o666),
    }
    wait_until(lambda: service.accounted() == 2, 30)
    state = service.root / "state"
    journal_files = [state / "journal.db", state / "journal.db-wal", state / "journal.db-shm"]
    assert {p.name: mode_of(p) for p in journal_files} == {p.name: 0o600 for p in journal_files}
    assert service.stop() == 0

    folders, files = {}, {}
    for top in ("outbox", "quarantine", "state"):
        for dirpath, _, filenames in os.walk(service.root / top):
            folders[dirpath] = mode_of(Path(dirpath))
            for name in filenames:
                files[os.path.join(dirpath, name)] = mode_of(Path(dirpath, name))
    journal, lock = str(state / "journal.db"), str(state / "medbatch.lock")
    assert {d: m for d, m in folders.items() if m != 0o750} == {}
    kept = {
        f
        for f in files
        if Path(f).is_relative_to(state / "archive")
        or Path(f).is_relative_to(service.root / "quarantine")
    }
    keys = {str(state / "audit-name.key"), str(state / "audit-chain.key")}  # created on start
    private = {journal, lock, *keys, *kept}
    assert {f: m for f, m in files.items() if m != 0o640 and f not in private} == {}
    assert {files[f] for f in private} == {0o600}
    # what was checked: a published folder, a quarantined input and its sidecar, an archive
    kinds = {Path(f).relative_to(service.root).parts[0:2] for f in files}
    assert {("outbox", "emr"), ("outbox", "_audit"), ("quarantine", "emr")} <= kinds
    assert {("state", "archive")} <= kinds
    check_accounting(service, dropped)


def test_a_batch_folder_is_private_until_published(tmp_path: Path) -> None:
    """The staging folder is 0700 (as mkdtemp) whatever the umask; publish makes the folder 0750
    and whatever the processor wrote 0640."""
    old_umask = os.umask(0)
    try:
        tmp = staging_folder(tmp_path / "emr", "b1")
        assert mode_of(tmp) == 0o700
        assert mode_of(tmp_path / "emr") == 0o750
        (tmp / "result.csv").write_text("x\n")
        os.chmod(tmp / "result.csv", 0o666)
        publish(tmp, tmp_path / "emr" / "b1")
    finally:
        os.umask(old_umask)
    assert mode_of(tmp_path / "emr" / "b1") == 0o750
    assert stat.S_IMODE(os.stat(tmp_path / "emr" / "b1" / "result.csv").st_mode) == 0o640

"""Faults injected for real into the running service: poison files that kill or hang their worker,
a full outbox filesystem, a corrupt journal, an inotify queue overflow, a recreated inbox,
re-drops, vanishing files and slow writers. Each test ends with the accounting checker."""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import time
from pathlib import Path
from typing import Any

import pytest

from tests.support.accounting import check_accounting
from tests.support.data import emr_csv
from tests.support.faults import (
    events,
    fill,
    log_lines,
    nice_of,
    pool_workers,
    seed_from_env,
    session_pids,
    sha256,
    stderr_tail,
    stopped,
    sysctl,
    tmpfs,
)
from tests.support.service import Service, cpu_s
from tests.support.waiting import wait_until
from tests.system.conftest import MakeService


def emr(**overrides: object) -> dict[str, object]:
    return {"name": "emr", "kind": "emr", "max_files": 1000, "max_wait": 1, "settle_s": 0.1,
            **overrides}  # fmt: skip


def faulty(**overrides: object) -> dict[str, object]:
    return {"name": "notes", "kind": "faulty", "max_files": 8, "max_wait": 60, "settle_s": 0.1,
            **overrides}  # fmt: skip


def note(i: int, marker: bytes = b"") -> bytes:
    return b"".join(f"note {i} line {j}\n".encode() for j in range(i % 5 + 1)) + marker


def assert_alive(service: Service, what: str) -> None:
    assert service.process is not None
    code = service.process.poll()
    assert code is None, f"the service died ({what}), exit {code}:\n{stderr_tail(service)}"


def published_names(service: Service, pipeline: str | None = None) -> list[str]:
    return sorted(i["name"] for i in service.published_inputs(pipeline))


# -- worker faults ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "marker",
    [b"MEDBATCH-TEST-CRASH", b"MEDBATCH-TEST-SEGV", b"MEDBATCH-TEST-WRITE-CRASH"],
    ids=["sigkill", "segv", "sigkill-after-staging"],
)
def test_poison_file_that_kills_its_worker_is_isolated_the_others_publish(
    make_service: MakeService, marker: bytes
) -> None:
    """One file of a batch of 8 kills its worker (SIGKILL, a segfault, or SIGKILL once the
    result is written into the staging folder): the batch is split down to that file, which is
    quarantined as `worker_crash`; the 7 others are published; no staging folder is left."""
    rng = random.Random(seed_from_env())
    poison = rng.randrange(8)
    service = make_service([faulty()])
    service.start()
    dropped = {
        f"note{i}.txt": service.drop(
            "notes", f"note{i}.txt", note(i, marker if i == poison else b"")
        )
        for i in range(8)
    }
    wait_until(
        lambda: service.quarantined() or service.process.poll() is not None,
        120,
        message="the poison file quarantined",
    )
    wait_until(lambda: len(service.published_inputs()) >= 7, 60, message="7 others published")
    assert_alive(service, "after isolating the poison file")
    wait_until(lambda: len(pool_workers(service)) == 2, 15, message="the pool back to 2 workers")
    assert service.stop() == 0

    quarantined = service.quarantined()
    assert [(q["name"], q["reason"]) for q in quarantined] == [
        (f"note{poison}.txt", "worker_crash")
    ]
    assert published_names(service) == sorted(n for n in dropped if n != f"note{poison}.txt")
    # Two crashes at each size, 8 → 4 → 2 → 1: a retry, then a split (or, alone, the end).
    splits = events(service, "batch.split", reason="worker_crash")
    assert len(splits) == 3, f"8 → 4 → 2 → 1 takes three splits, saw {len(splits)}"
    retried = events(service, "batch.retried", reason="worker_crash")
    assert len(retried) == 4, f"one retry at each of the 4 sizes, saw {len(retried)}"
    failed = events(service, "batch.failed", reason="worker_crash")
    assert [f["attempts"] for f in failed] == [2]
    check_accounting(service, dropped)


def test_workers_run_below_the_service_and_so_do_their_replacements(
    make_service: MakeService,
) -> None:
    """`workers.nice` steps below the service, for the first workers and for one started after
    a worker died: on two cores, the main loop had waited on the run queue for its own workers
    for 0.7 s of a 4 s run (20,000 small files)."""
    service = make_service([faulty(max_files=1)], workers={"count": 2, "nice": 7})
    service.start()
    assert service.process is not None
    base = nice_of(service.process.pid)

    def niceness() -> list[int]:  # a spawned worker sets it once its imports are done
        return [nice_of(pid) for pid in pool_workers(service)]

    wait_until(lambda: niceness() == [base + 7] * 2, 30, message=f"2 workers at {base + 7}")
    first = pool_workers(service)
    os.kill(first[0], signal.SIGKILL)
    wait_until(
        lambda: first[0] not in pool_workers(service) and niceness() == [base + 7] * 2,
        30,
        message=f"the killed worker replaced, at {base + 7}",
    )
    service.drop("notes", "after.txt", note(1))
    wait_until(lambda: service.published_inputs(), 60, message="a batch published after")
    assert service.stop() == 0


def test_hung_worker_is_killed_retried_once_then_quarantined_as_timeout(
    make_service: MakeService,
) -> None:
    """A batch that hangs its worker past `batch_timeout_s` (3 s) has the worker killed, is
    retried once, then quarantined as `timeout`; other batches keep publishing meanwhile and no
    worker process is left behind."""
    service = make_service(
        [faulty(max_files=1), emr(max_files=3, max_wait=0.5)],
        workers={"count": 2, "batch_timeout_s": 3},
    )
    service.start()
    sid = service.process.pid
    dropped = {"hang.txt": service.drop("notes", "hang.txt", note(1, b"MEDBATCH-TEST-HANG"))}
    wait_until(lambda: events(service, "batch.started", pipeline="notes"), 10)
    hung_at = time.time()
    rng = random.Random(5)
    for i in range(30):  # a steady stream of EMR tables while the worker hangs
        dropped[f"v{i}.csv"] = service.drop("emr", f"v{i}.csv", emr_csv(rng, rows=10))
        time.sleep(0.3)
    wait_until(
        lambda: service.quarantined() or service.process.poll() is not None,
        60,
        message="hang.txt quarantined",
    )
    wait_until(lambda: len(service.published_inputs("emr")) == 30, 30, message="EMR published")
    assert_alive(service, "after the timeouts")
    wait_until(lambda: len(pool_workers(service)) == 2, 15, message="the pool back to 2 workers")
    assert service.stop() == 0

    assert [(q["name"], q["reason"]) for q in service.quarantined()] == [("hang.txt", "timeout")]
    attempts = [a["attempt"] for a in events(service, "batch.started", pipeline="notes")]
    assert attempts == [1, 2], f"attempts of the hung batch: {attempts}"
    retried = events(service, "batch.retried", pipeline="notes")
    assert [r["reason"] for r in retried] == ["timeout"]
    failed = events(service, "batch.failed", pipeline="notes")
    assert [f["reason"] for f in failed] == ["timeout"]
    during = [
        m for m in service.manifests("emr")
        if hung_at < iso_ts(m["published_at"]) < iso_ts(str(failed[0]["ts"]))
    ]  # fmt: skip
    assert during, "no EMR batch was published while the worker hung"
    wait_until(lambda: not session_pids(sid), 10, message="no process of the service left")
    check_accounting(service, dropped)


def iso_ts(text: str) -> float:
    from datetime import datetime

    return datetime.fromisoformat(text.replace("Z", "+00:00")).timestamp()


# -- disk faults ------------------------------------------------------------------------------


def test_full_outbox_pauses_intake_and_resumes_when_space_returns(
    make_service: MakeService, tmp_path: Path
) -> None:
    """ENOSPC on the outbox (a 3 MiB tmpfs, the audit log on it too): the service stays up,
    nothing is published, no temp folder is left, intake pauses (log line, journal, status) and
    later files wait in the inbox; once space returns, work resumes by itself and every file is
    published."""
    service = make_service([emr(max_files=10, max_wait=1)], service={"tick_s": 0.1, "rescan_s": 2})
    with tmpfs(tmp_path / "outbox", 3 * 1024 * 1024):
        try:
            service.start()
            ballast = service.outbox / ".ballast"
            # Given an outbox filesystem with no space left
            fill(ballast)
            rng = random.Random(11)
            # When files arrive
            dropped = {
                f"v{i}.csv": service.drop("emr", f"v{i}.csv", emr_csv(rng, rows=30))
                for i in range(10)
            }
            # Then intake pauses, and stays paused while the disk is full
            wait_until(
                lambda: paused(service) or service.process.poll() is not None,
                30,
                message="intake paused",
            )
            assert_alive(service, "out of space on the outbox (and its audit log)")
            paused_at = time.time()
            later = {}
            for i in range(10, 15):
                later[f"v{i}.csv"] = service.drop("emr", f"v{i}.csv", emr_csv(rng, rows=30))
            cpu_at_drop = cpu_s(service.process.pid)
            wait_until(lambda: time.time() > paused_at + 4, 10, message="4 s of being full")
            assert_alive(service, "while the disk is full")
            # The files waiting are due to be claimed: the main loop must wait, not spin on them
            spent = cpu_s(service.process.pid) - cpu_at_drop
            assert spent < 1.0, f"{spent:.2f} CPU-s in ~4 s paused with files waiting"
            reason = paused(service)
            assert reason, "no longer paused although the disk is still full"
            assert count_log(service, "intake.paused") >= 1
            assert service.manifests() == [], "published without space (or its audit line)"
            assert list(service.outbox.glob("*/.tmp-*")) == []
            waiting = sorted(p.name for p in (service.inbox / "emr").iterdir())
            assert waiting == sorted(later), f"taken while paused: {set(later) - set(waiting)}"
            status = service.run("status", "--json", timeout_s=30)
            assert str(reason) in status.stdout, f"status does not say why:\n{status.stdout}"
            # When space returns, work resumes by itself
            ballast.unlink()
            dropped.update(later)
            wait_until(
                lambda: service.accounted() == len(dropped) or service.process.poll() is not None,
                60,
                message="all published after space returned",
            )
            assert_alive(service, "after space returned")
            assert service.stop() == 0
        finally:
            service.kill_all()
        assert events(service, "intake.resumed"), "no intake.resumed audit line"
        assert paused(service) is None
        check_accounting(service, dropped)


def paused(service: Service) -> Any:
    rows = service.journal("SELECT value FROM meta WHERE key='paused'")
    return json.loads(rows[0][0]) if rows else None


def count_log(service: Service, event: str) -> int:
    return sum(1 for line in log_lines(service) if line.get("event") == event)


# -- the journal ------------------------------------------------------------------------------


def corrupt_garbage(path: Path) -> None:
    path.write_bytes(random.Random(1).randbytes(path.stat().st_size))


def corrupt_page_type(path: Path) -> None:
    """Flip the type byte of the last b-tree page (what a bad sector does to one page)."""
    data = bytearray(path.read_bytes())
    data[len(data) - 4096] = 0x07
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("corrupt", [corrupt_garbage, corrupt_page_type], ids=["garbage", "page"])
def test_corrupt_journal_refuses_to_start_and_is_left_untouched(
    make_service: MakeService, corrupt: Any
) -> None:
    """A journal that fails its integrity check: `run` exits non-zero with a message naming the
    journal, and never recreates or rewrites it."""
    service = make_service([emr(max_files=3)])
    service.start()
    for i in range(3):
        service.drop("emr", f"v{i}.csv", emr_csv(random.Random(i)))
    wait_until(lambda: service.accounted() == 3, 30)
    assert service.stop() == 0
    journal = service.root / "state" / "journal.db"
    assert not journal.with_name("journal.db-wal").exists(), "a clean stop leaves no WAL"
    corrupt(journal)
    before = sha256(journal.read_bytes())
    audit_before = [a["seq"] for a in service.audit()]

    for command in (["run"], ["run", "--once"]):
        done = service.run(*command, timeout_s=60)
        assert done.returncode not in (0, None), done.stderr
        assert str(journal) in done.stderr and "journal" in done.stderr, done.stderr
        assert "Traceback" not in done.stderr, done.stderr
    assert sha256(journal.read_bytes()) == before, "the corrupt journal was rewritten"
    assert [a["seq"] for a in service.audit()] == audit_before, "it wrote to the audit log"


# -- intake faults ----------------------------------------------------------------------------


def test_inotify_overflow_loses_no_file(make_service: MakeService) -> None:
    """The service stopped while more files arrive than its inotify queue holds (each drop is
    five events: create, modify, close, moved from, moved to): the queue overflows, and the
    periodic rescan still finds every file. The host's limit is used as it is, so services of
    tests running beside this one keep theirs; only a host with a raised limit gets it lowered
    for the moment this service starts."""
    limit = int(Path("/proc/sys/fs/inotify/max_queued_events").read_text())
    lowered = min(limit, 16384)
    service = make_service(
        [emr(max_files=500, max_wait=1, settle_s=0.2)], service={"tick_s": 0.1, "rescan_s": 2}
    )
    rng = random.Random(seed_from_env())
    contents = [emr_csv(rng, rows=2) for _ in range(lowered // 4 + 500)]
    if lowered < limit:
        with sysctl("fs.inotify.max_queued_events", lowered):
            service.start()  # its inotify instance is made under the lowered limit
    else:
        service.start()
    dropped = {}
    with stopped(service.process.pid):
        for i, content in enumerate(contents):
            dropped[f"burst{i:05d}.csv"] = service.drop("emr", f"burst{i:05d}.csv", content)
    wait_until(
        lambda: service.accounted() == len(dropped) or service.process.poll() is not None,
        120,
        interval_s=0.2,
        message=f"all {len(dropped)} files accounted",
    )
    assert_alive(service, "after the overflow")
    assert service.stop() == 0
    lines = log_lines(service)
    assert any("overflow" in str(line.get("event", "")).lower() for line in lines), "no overflow"
    found = sum(int(line.get("files", 0)) for line in lines
                if line.get("event") == "intake.rescan_found")  # fmt: skip
    assert found >= 400, f"the rescan found only {found} of the files the queue lost"
    check_accounting(service, dropped)


def test_recreated_inbox_folder_is_watched_again(make_service: MakeService) -> None:
    """Delete and recreate `<inbox>/emr` while the service runs (rescan far away): the watcher
    is re-armed, and files dropped afterwards are processed."""
    service = make_service([emr(max_files=3)], service={"tick_s": 0.1, "rescan_s": 600})
    service.start()
    rng = random.Random(7)
    dropped = {f"a{i}.csv": service.drop("emr", f"a{i}.csv", emr_csv(rng)) for i in range(3)}
    wait_until(lambda: service.accounted() == 3, 30)
    folder = service.inbox / "emr"
    shutil.rmtree(folder)
    folder.mkdir()
    for i in range(3):
        dropped[f"b{i}.csv"] = service.drop("emr", f"b{i}.csv", emr_csv(rng))
    wait_until(
        lambda: service.accounted() == 6 or service.process.poll() is not None,
        30,
        message="files dropped into the recreated folder processed",
    )
    assert service.stop() == 0
    check_accounting(service, dropped)


def test_redrops_follow_the_duplicates_policy(make_service: MakeService, tmp_path: Path) -> None:
    """Same content under a new name after publication: archived as a duplicate, with a
    `file.duplicate` audit line naming the earlier batch (also after a restart). Same name, new
    content: a new file. With `duplicates = "process"`, the same content is processed again."""
    (tmp_path / "skip").mkdir()
    (tmp_path / "process").mkdir()
    service = make_service([emr(max_files=1)], root=tmp_path / "skip")
    service.start()
    rng = random.Random(3)
    first, second = emr_csv(rng), emr_csv(rng)
    dropped = [("a.csv", service.drop("emr", "a.csv", first))]
    wait_until(lambda: service.accounted() == 1, 30)
    earlier = service.manifests("emr")[0]["batch_id"]
    assert service.stop() == 0
    service.start()
    dropped.append(("b.csv", service.drop("emr", "b.csv", first)))
    wait_until(lambda: events(service, "file.duplicate"), 30, message="file.duplicate")
    dropped.append(("a.csv", service.drop("emr", "a.csv", second)))
    wait_until(lambda: service.accounted() == 3, 30)
    assert service.stop() == 0
    (dup,) = events(service, "file.duplicate")
    assert dup["batch_id"] == earlier and dup["sha256"] == sha256(first)
    assert [i["name"] for m in service.manifests() for i in m["inputs"]] == ["a.csv", "a.csv"]
    archived = [p for p in (service.root / "state" / "archive").rglob("*") if p.is_file()]
    assert sorted(sha256(p.read_bytes()) for p in archived) == sorted(
        [sha256(first), sha256(first), sha256(second)]
    ), "the duplicate is archived beside the published inputs"
    check_accounting(service, dropped)

    again = make_service([emr(max_files=1, duplicates="process")], root=tmp_path / "process")
    again.start()
    dropped = []
    for n, name in enumerate(("a.csv", "c.csv", "a.csv"), start=1):
        dropped.append((name, again.drop("emr", name, first)))
        wait_until(lambda n=n: again.accounted() == n, 30)
    assert again.stop() == 0
    assert len(again.manifests()) == 3 and not events(again, "file.duplicate")
    check_accounting(again, dropped)


def test_files_that_vanish_before_their_claim_are_skipped_quietly(
    make_service: MakeService,
) -> None:
    """Files deleted by their sender around the moment the service would claim them: each is
    either claimed (then accounted for) or gone without a trace: no journal row, no audit line,
    no warning or error."""
    seed = seed_from_env()
    rng = random.Random(seed)
    service = make_service([emr(max_files=50, settle_s=1.0)])
    service.start()
    names = [f"v{i:03d}.csv" for i in range(60)]
    # Written in place, so the settle rule applies (a file renamed in is taken at once).
    shas = {}
    for n in names:
        content = emr_csv(rng, rows=5)
        (service.inbox / "emr" / n).write_bytes(content)
        shas[n] = sha256(content)
    dropped_at = time.monotonic()
    # Delete 50 of them at moments spread around the settle time (1 s); keep 10.
    plan = sorted((rng.uniform(0.0, 1.6), n) for n in names[:50])
    vanished = []
    for at, name in plan:
        delay = dropped_at + at - time.monotonic()
        if delay > 0:
            time.sleep(delay)
        try:
            (service.inbox / "emr" / name).unlink()
            vanished.append(name)
        except FileNotFoundError:
            pass  # the service claimed it first
    claimed = {n: s for n, s in shas.items() if n not in vanished}
    wait_until(lambda: service.accounted() == len(claimed), 30, message="claimed ones accounted")
    assert service.stop() == 0
    print(f"seed={seed} vanished={len(vanished)} claimed={len(claimed)}")
    assert vanished, "no file vanished: the timing missed the window"
    rows = service.journal(
        f"SELECT name FROM files WHERE name IN ({','.join('?' * len(vanished))})", *vanished
    )
    assert rows == [], f"journal rows for vanished files: {rows}"
    mentioned = [a for a in service.audit() if a.get("file") in vanished]
    assert mentioned == [], f"audit lines for vanished files: {mentioned[:3]}"
    loud = [line for line in log_lines(service) if line.get("level") not in ("info", "debug")]
    assert loud == [], f"warnings or errors: {loud[:3]}"
    check_accounting(service, claimed)


@pytest.mark.parametrize("held_open", [True, False], ids=["held-open", "reopened"])
def test_slow_writer_is_not_taken_while_it_writes(
    make_service: MakeService, held_open: bool
) -> None:
    """A writer adding a line every 0.3 s for 3 s straight into the inbox (settle_s = 1), the
    file held open or reopened for each line: it is taken only once complete, with every row."""
    service = make_service([emr(max_files=1, settle_s=1.0, min_cell_size=1)])  # exact rows
    service.start()
    rng = random.Random(9)
    content = emr_csv(rng, rows=10)
    path = service.inbox / "emr" / "slow.csv"
    lines = content.splitlines(keepends=True)
    if held_open:
        with path.open("wb") as fh:
            for line in lines:
                fh.write(line)
                fh.flush()
                time.sleep(0.3)
    else:
        for line in lines:
            with path.open("ab") as fh:
                fh.write(line)
            time.sleep(0.3)
    wait_until(lambda: service.accounted() == 1, 30)
    assert service.stop() == 0
    (item,) = service.published_inputs("emr")
    assert (item["name"], item["rows"], item["sha256"]) == ("slow.csv", 10, sha256(content))
    check_accounting(service, {"slow.csv": sha256(content)})


def test_inputs_the_archive_refused_leave_the_spool_once_it_accepts_them(
    make_service: MakeService,
) -> None:
    """An archive that cannot take the published inputs (here its pipeline folder is a file;
    the same for a full or read-only disk) keeps them in the spool, says so, and tries again by
    itself, later each time: once the cause is gone they are archived with no new batch."""
    # Given an archive whose pipeline folder cannot be made
    service = make_service([emr(max_files=5)])
    blocker = service.root / "state" / "archive" / "emr"
    blocker.parent.mkdir(parents=True)
    blocker.write_bytes(b"not a folder")
    service.start()
    rng = random.Random(31)
    dropped = {f"v{i}.csv": service.drop("emr", f"v{i}.csv", emr_csv(rng)) for i in range(10)}
    # When its batches publish
    wait_until(lambda: len(service.published_inputs("emr")) == len(dropped), 60)
    # Then the inputs stay in the spool, the failure is logged and a retry scheduled
    wait_until(lambda: count_log(service, "disposal.retry_scheduled") >= 2, 60,
               message="a second, later retry")  # fmt: skip
    waits = [
        e["retry_in_s"] for e in service.logs() if e.get("event") == "disposal.retry_scheduled"
    ]
    assert waits[1] > waits[0], waits
    assert len(list((service.spool / "emr").iterdir())) == len(dropped)
    assert service.journal("SELECT count(*) FROM files WHERE disposed=0") == [(len(dropped),)]
    # When the cause is gone (and no new file comes)
    blocker.unlink()
    # Then the next retry archives every input, and the spool is empty
    wait_until(
        lambda: service.journal("SELECT count(*) FROM files WHERE disposed=0") == [(0,)], 90,
        message="the inputs archived",
    )  # fmt: skip
    assert list((service.spool / "emr").iterdir()) == []
    archived = [p for p in (service.root / "state" / "archive").rglob("*") if p.is_file()]
    assert sorted(sha256(p.read_bytes()) for p in archived) == sorted(dropped.values())
    assert_alive(service, "after the archive came back")
    assert service.stop() == 0

"""Stop and restart: SIGTERM drains, a second SIGTERM stops at once, kill -9 at the worst moment,
windows that straddle a crash or a SIGSTOP, and what a crash leaves on disk cleaned at start."""

from __future__ import annotations

import os
import random
import signal
import sqlite3
import time
from datetime import datetime
from typing import Any

from tests.support.accounting import check_accounting
from tests.support.data import emr_csv
from tests.support.faults import (
    events,
    seed_from_env,
    session_pids,
    sha256,
    stderr_tail,
    stopped,
)
from tests.support.service import Service
from tests.support.waiting import wait_until
from tests.system.conftest import MakeService


def emr(**overrides: object) -> dict[str, object]:
    return {"name": "emr", "kind": "emr", "max_files": 1000, "max_wait": 1, "settle_s": 0.1,
            **overrides}  # fmt: skip


def slow(**overrides: object) -> dict[str, object]:
    return {"name": "slow", "kind": "faulty", "max_files": 1, "settle_s": 0.1, **overrides}


def ts(text: str) -> float:
    return datetime.fromisoformat(text.replace("Z", "+00:00")).timestamp()


def audit_since(service: Service, seq: int, event: str) -> list[dict[str, Any]]:
    return [a for a in service.audit() if a["seq"] > seq and a["event"] == event]


def last_seq(service: Service) -> int:
    lines = service.audit()
    return int(lines[-1]["seq"]) if lines else 0


# -- SIGTERM ----------------------------------------------------------------------------------


def test_sigterm_drains_the_batch_in_flight_within_the_graceful_timeout(
    make_service: MakeService,
) -> None:
    """SIGTERM while a 3-second batch runs: the service waits for it, publishes it, exits 0
    well within `graceful_timeout_s`."""
    service = make_service([slow()], service={"tick_s": 0.1, "graceful_timeout_s": 20})
    service.start()
    sid = service.process.pid
    dropped = {"slow.txt": service.drop("slow", "slow.txt", b"a\nMEDBATCH-TEST-SLEEP-3\n")}
    wait_until(lambda: events(service, "batch.started"), 10)

    started = time.monotonic()
    assert service.stop(timeout_s=30) == 0, stderr_tail(service)
    took = time.monotonic() - started

    assert took < 20, f"the drain took {took:.1f}s"
    assert [i["name"] for i in service.published_inputs()] == ["slow.txt"]
    assert events(service, "daemon.draining")
    (stopped_line,) = events(service, "daemon.stopped")
    assert "interrupted" not in stopped_line
    wait_until(lambda: not session_pids(sid), 10, message="no worker left")
    check_accounting(service, dropped)


def test_second_sigterm_stops_at_once_and_the_next_start_recovers(
    make_service: MakeService,
) -> None:
    """A second SIGTERM during a long drain stops the service at once (exit 0, workers gone);
    the next start re-runs the interrupted batch; every input is accounted for once."""
    service = make_service(
        [slow(), emr(max_files=5)], service={"tick_s": 0.1, "graceful_timeout_s": 60}
    )
    service.start()
    sid = service.process.pid
    rng = random.Random(2)
    dropped = {f"v{i}.csv": service.drop("emr", f"v{i}.csv", emr_csv(rng)) for i in range(5)}
    wait_until(lambda: service.accounted() == 5, 20)
    dropped["slow.txt"] = service.drop("slow", "slow.txt", b"a\nMEDBATCH-TEST-SLEEP-6\n")
    wait_until(lambda: events(service, "batch.started", pipeline="slow"), 10)

    service.signal(signal.SIGTERM)
    wait_until(lambda: events(service, "daemon.draining"), 10)
    started = time.monotonic()
    service.signal(signal.SIGTERM)
    assert service.process.wait(timeout=20) == 0, stderr_tail(service)
    took = time.monotonic() - started
    assert took < 4, f"the second SIGTERM took {took:.1f}s to stop the service"
    wait_until(lambda: not session_pids(sid), 10, message="no worker left")
    assert service.published_inputs("slow") == []

    service.start()
    wait_until(lambda: service.accounted() == len(dropped), 30, message="re-run published")
    assert service.stop() == 0
    (recovered,) = events(service, "daemon.recovered")
    assert recovered["batches_rerun"] == 1
    check_accounting(service, dropped)


# -- batch windows across a crash or a freeze -------------------------------------------------


def test_window_half_over_at_a_crash_seals_at_its_original_deadline(
    make_service: MakeService,
) -> None:
    """kill -9 half way through a batch's window (max_wait 8 s): after the restart the batch
    seals at its first file's arrival + max_wait, not a whole window after the restart."""
    service = make_service([emr(max_wait=8)])
    service.start()
    rng = random.Random(4)
    dropped = {"first.csv": service.drop("emr", "first.csv", emr_csv(rng))}
    wait_until(lambda: service.journal("SELECT 1 FROM files WHERE state='received'"), 10)
    (received_at,) = service.journal("SELECT received_at FROM files")[0]
    dropped["second.csv"] = service.drop("emr", "second.csv", emr_csv(rng))
    wait_until(lambda: service.journal("SELECT count(*) FROM files")[0][0] == 2, 10)
    wait_until(lambda: time.time() >= received_at + 3, 10, message="half the window")

    service.kill_all()
    restarted_at = time.time()
    service.start()
    (manifest,) = wait_until(lambda: service.manifests("emr"), 30)
    assert service.stop() == 0

    sealed_at = ts(manifest["sealed_at"])
    assert abs(sealed_at - (received_at + 8)) <= 1.5, (
        f"sealed {sealed_at - received_at:.1f}s after the first file (want 8), "
        f"{sealed_at - restarted_at:.1f}s after the restart"
    )
    assert sorted(i["name"] for i in manifest["inputs"]) == ["first.csv", "second.csv"]
    check_accounting(service, dropped)


def test_sigstop_longer_than_a_window_seals_each_due_batch_once(
    make_service: MakeService,
) -> None:
    """SIGSTOP for 5 s across two pipelines' 2-second windows, then SIGCONT: each pipeline's
    batch seals exactly once, and no input is in two manifests."""
    service = make_service([emr(max_wait=2), emr(name="labs", max_wait=2)])
    service.start()
    rng = random.Random(6)
    dropped = {}
    for pipeline in ("emr", "labs"):
        for i in range(3):
            name = f"{pipeline}{i}.csv"
            dropped[name] = service.drop(pipeline, name, emr_csv(rng))
    wait_until(lambda: service.journal("SELECT count(*) FROM files")[0][0] == 6, 10)
    assert not events(service, "batch.sealed"), "sealed before the freeze: the test is too slow"

    with stopped(service.process.pid):
        time.sleep(5)  # the freeze itself is the fault, longer than the window
    wait_until(lambda: service.accounted() == 6, 20)
    # Several ticks after the thaw, in case a late one seals again.
    wait_until(lambda: time.time() > ts(service.manifests()[-1]["published_at"]) + 2, 10)
    assert service.stop() == 0

    sealed = [a["pipeline"] for a in events(service, "batch.sealed")]
    assert sorted(sealed) == ["emr", "labs"], f"batch.sealed lines: {sealed}"
    check_accounting(service, dropped)


# -- kill -9 at the worst moments -------------------------------------------------------------


def crash_snapshot(service: Service) -> dict[str, int]:
    """What recovery should find, read from the journal and the disk right after a kill."""
    rerun = service.journal(
        "SELECT count(DISTINCT b.id) FROM batches b JOIN files f ON f.batch_id = b.id "
        "WHERE b.state IN ('sealed', 'running') AND f.state = 'batched'"
    )[0][0]
    received = service.journal("SELECT count(*) FROM files WHERE state='received'")[0][0]
    claiming = service.journal("SELECT count(*) FROM files WHERE state='claiming'")[0][0]
    staging = len(list(service.outbox.glob("*/.tmp-*")))
    ahead = 0  # published on disk, not yet in the journal: the crash fell in between
    for (batch_id,) in service.journal(
        "SELECT id FROM batches WHERE state IN ('sealed', 'running')"
    ):
        ahead += (service.outbox / "emr" / batch_id / "manifest.json").exists()
    return {
        "batches_rerun": rerun,
        "files_rebatched": received,
        "claims": claiming,
        "stale_staging": staging,
        "published_ahead": ahead,
    }


def wait_for_new_folder(service: Service, known: set[str], timeout_s: float) -> bool:
    """Poll the outbox as fast as we can; True the moment a new batch folder appears."""
    folder = service.outbox / "emr"
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            names = {e.name for e in os.scandir(folder) if not e.name.startswith(".")}
        except FileNotFoundError:
            names = set()
        if names - known:
            return True
        time.sleep(0.0005)
    return False


def recovered_line_of_next_run(service: Service, after_seq: int) -> dict[str, Any]:
    """The `daemon.recovered` line of the first run that started after `after_seq` ({} when
    that run found nothing to recover)."""
    starts = 0
    for line in service.audit():
        if line["seq"] <= after_seq:
            continue
        if line["event"] == "daemon.started":
            starts += 1
            if starts == 2:
                break
        elif line["event"] == "daemon.recovered":
            return line
    return {}


def test_kill_right_around_publication_never_publishes_twice(make_service: MakeService) -> None:
    """kill -9 (service and workers) right as a batch starts, or the instant its folder
    appears (between publish and journal commit), 16 times: no batch is published twice, no two
    folders share an input, and each start's `daemon.recovered` line reports what it found."""
    seed = seed_from_env()
    rng = random.Random(seed)
    service = make_service([emr(max_files=20, max_wait=0.5)])
    dropped: dict[str, str] = {}
    snapshots: list[tuple[int, dict[str, int]]] = []
    n = 0
    for round_ in range(16):
        for _ in range(40):
            name = f"r{round_:02d}-{n:04d}.csv"
            dropped[name] = service.drop("emr", name, emr_csv(rng, rows=rng.randint(100, 400)))
            n += 1
        seq = last_seq(service)
        known = {m["batch_id"] for m in service.manifests("emr")}
        service.start()
        if round_ % 2:
            hit = wait_for_new_folder(service, known, timeout_s=20)
        else:
            hit = bool(wait_until(lambda s=seq: audit_since(service, s, "batch.started"), 20))
            time.sleep(rng.uniform(0.0, 0.3))
        assert service.process.poll() is None, stderr_tail(service)
        service.kill_all()
        assert hit
        snapshots.append((last_seq(service), crash_snapshot(service)))
    service.start()
    wait_until(lambda: service.accounted() == len(dropped), 60, message="all accounted")
    assert service.stop() == 0

    for after_seq, expected in snapshots:
        line = recovered_line_of_next_run(service, after_seq)
        claims = line.get("claims_finished", 0)
        assert claims <= expected["claims"], f"{claims} claims finished of {expected['claims']}"
        got = {k: line.get(k, 0) for k in ("batches_rerun", "files_rebatched", "stale_staging")}
        want = {k: expected[k] for k in got}
        want["files_rebatched"] += claims  # a finished claim is a received file to batch
        assert got == want, f"daemon.recovered after a kill: {got}, the journal had {want}"
    ahead = sum(s["published_ahead"] for _, s in snapshots)
    print(f"seed={seed} kills={len(snapshots)} published_ahead_of_journal={ahead}")
    check_accounting(service, dropped)


# -- leftovers of a crash ---------------------------------------------------------------------


def test_stray_staging_and_an_interrupted_claim_are_finished_at_start(
    make_service: MakeService,
) -> None:
    """What a crash leaves behind: a `.tmp-*` staging folder (removed) and a claim interrupted
    after its rename (finished: received, with its audit line, and published under its name);
    `daemon.recovered` says so."""
    service = make_service([emr(max_files=10)])
    service.start()
    assert service.stop() == 0
    stray = service.outbox / "emr" / ".tmp-20200101T000000Z-emr-deadbeef"
    stray.mkdir(parents=True)
    (stray / "result.csv").write_text("half a result")
    claimed = emr_csv(random.Random(8))
    (service.spool / "emr").mkdir(parents=True, exist_ok=True)
    (service.spool / "emr" / "18c0ffee-aaaa0001.csv").write_bytes(claimed)
    db = sqlite3.connect(service.root / "state" / "journal.db", isolation_level=None)
    db.execute(  # the journal's intent, written before the rename that the crash followed
        "INSERT INTO files (pipeline, name, spool_name, received_at, state) "
        "VALUES ('emr', 'claimed.csv', 'emr/18c0ffee-aaaa0001.csv', ?, 'claiming')",
        (time.time() - 5,),
    )
    db.close()

    service.start()
    wait_until(lambda: service.accounted() == 1, 20, message="the interrupted claim published")
    assert service.stop() == 0

    assert not stray.exists()
    (recovered,) = events(service, "daemon.recovered")
    assert recovered["stale_staging"] == 1 and recovered["claims_finished"] == 1
    assert [(i["name"], i["sha256"]) for i in service.published_inputs()] == [
        ("claimed.csv", sha256(claimed))
    ]
    assert events(service, "file.received", file="claimed.csv"), "received, but never audited"
    check_accounting(service, {"claimed.csv": sha256(claimed)})


def test_spooled_file_the_journal_does_not_know_is_not_left_behind_or_lost(
    make_service: MakeService,
) -> None:
    """A file in the spool with no journal row (a journal restored from a backup, a lost
    write): at start it is neither left in the spool nor deleted, but accounted for (published
    or quarantined, once)."""
    service = make_service([emr(max_files=10)])
    service.start()
    assert service.stop() == 0
    orphan = emr_csv(random.Random(9))
    (service.spool / "emr").mkdir(parents=True, exist_ok=True)
    (service.spool / "emr" / "18c0ffee-bbbb0002.csv").write_bytes(orphan)

    service.start()
    wait_until(
        lambda: not any(p.is_file() for p in service.spool.rglob("*")),
        15,
        message="the unknown spooled file taken out of the spool",
    )
    wait_until(lambda: service.accounted() == 1, 15, message="the unknown spooled file accounted")
    assert service.stop() == 0

    outcomes = [(i["name"], i["sha256"]) for i in service.published_inputs()]
    outcomes += [(q["name"], q["sha256"]) for q in service.quarantined()]
    found = [o for o in outcomes if o[1] == sha256(orphan)]
    assert len(found) == 1, f"the unknown spooled file ended up as {found}"
    check_accounting(service, found)

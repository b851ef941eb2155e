"""`medbatch status [--json]`: per-pipeline counts from the journal, exit 0/1/3."""

from __future__ import annotations

import json
import random
import signal
import sqlite3
import time
import urllib.request
from pathlib import Path
from typing import Any

from prometheus_client.parser import text_string_to_metric_families

from daemon.journal import Journal
from daemon.models import Batch, BatchResult, IncomingFile
from tests.support.data import emr_csv
from tests.support.service import Service
from tests.support.waiting import wait_until
from tests.system.conftest import MakeService

PIPELINE_KEYS = {
    "priority",
    "configured",
    "open_batch",
    "waiting_batches",
    "in_flight",
    "published_today",
    "published_files",
    "quarantined",
    "quarantined_today",
    "duplicates",
    "oldest_waiting_s",
}
SERVICE_KEYS = {"state", "running", "healthy", "pid", "heartbeat_age_s", "problem", "day"}


def emr(**overrides: object) -> dict[str, object]:
    return {
        "name": "emr",
        "kind": "emr",
        "max_files": 3,
        "max_wait": 600,
        "settle_s": 0.1,
        **overrides,
    }


def status(service: Service) -> tuple[int, dict[str, Any]]:
    done = service.run("status", "--json", timeout_s=30)
    assert not done.stderr, done.stderr
    return done.returncode, json.loads(done.stdout)


def scrape(service: Service) -> dict[tuple[str, str | None], float]:
    """The service's /metrics (port from its `metrics.serving` log line), summed per pipeline."""
    port = next(line["port"] for line in service.logs() if line["event"] == "metrics.serving")
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as response:
        text = response.read().decode()
    found: dict[tuple[str, str | None], float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            key = (sample.name, sample.labels.get("pipeline"))
            if sample.name.endswith(("_total", "_count")) or (
                family.type == "gauge" and not sample.name.endswith("_created")
            ):
                found[key] = found.get(key, 0) + sample.value
    return found


def test_never_started_is_not_running(make_service: MakeService) -> None:
    """No journal yet: exit 3, and says why."""
    service = make_service([emr()])
    code, report = status(service)
    assert code == 3
    assert report["state"] == "not running" and report["pipelines"] == {}
    assert "never run" in report["problem"]
    text = service.run("status")
    assert text.returncode == 3 and text.stdout.startswith("medbatch: not running")


def test_running_service_counts_match_what_was_dropped(make_service: MakeService) -> None:
    """Two published batches (one bad input quarantined) and one open file: exit 0 with those
    counts; a writer holding the journal's lock does not block it; after a stop, exit 3."""
    # Given 6 files (one unreadable) published as two batches of 3, then one file left open
    service = make_service(
        [emr(priority=2)],
        service={"tick_s": 0.1, "rescan_s": 5, "metrics_address": "127.0.0.1:0"},
    )
    service.start()
    rng = random.Random(41)
    for i in range(5):
        service.drop("emr", f"v{i}.csv", emr_csv(rng))
    service.drop("emr", "broken.csv", b"\x00\x01binary junk")
    wait_until(lambda: service.accounted() == 6, 60, message="6 files accounted")
    service.drop("emr", "open.csv", emr_csv(rng))
    wait_until(lambda: service.journal("SELECT count(*) FROM files")[0][0] == 7)

    # When status runs beside the service
    code, report = status(service)

    # Then it is running and healthy, and the counts are what was dropped
    assert code == 0, report
    assert SERVICE_KEYS | {"pipelines"} == report.keys()
    assert (report["state"], report["running"], report["healthy"]) == ("running", True, True)
    assert report["pid"] == service.process.pid  # type: ignore[union-attr]
    assert 0 <= report["heartbeat_age_s"] < 10
    row = report["pipelines"]["emr"]
    assert row.keys() == PIPELINE_KEYS
    assert row["open_batch"]["files"] == 1 and 0 <= row["open_batch"]["age_s"] < 60
    assert row["oldest_waiting_s"] is not None
    assert {k: row[k] for k in ("priority", "waiting_batches", "in_flight")} == {
        "priority": 2,
        "waiting_batches": {},
        "in_flight": 0,
    }
    assert row["published_today"] == {"batches": 2, "files": 5}
    assert (row["published_files"], row["quarantined"], row["quarantined_today"]) == (5, 1, 1)
    text = service.run("status")
    assert text.returncode == 0 and text.stdout.startswith("medbatch: running (pid ")
    assert any(line.startswith("emr ") for line in text.stdout.splitlines())
    # And the Prometheus endpoint counts the same (the state gauges: tests/system/test_http.py)
    scraped = scrape(service)
    assert scraped.pop(("medbatch_intake_paused", None)) == 0
    for gauge in ("disk_free_bytes", "oldest_waiting_seconds", "last_publish_timestamp_seconds"):
        assert scraped.pop((f"medbatch_{gauge}", "emr" if "seconds" in gauge else None)) > 0
    assert scraped == {
        ("medbatch_files_received_total", "emr"): 7,
        ("medbatch_files_quarantined_total", "emr"): 1,
        ("medbatch_batches_published_total", "emr"): 2,
        ("medbatch_batch_run_seconds_count", "emr"): 2,
        ("medbatch_drop_to_publish_seconds_count", "emr"): 5,
        ("medbatch_in_flight", None): 0,
        ("medbatch_queue_depth", None): 0,
        ("medbatch_worker_restarts_total", None): 0,
    }

    # And a writer holding the journal's lock does not make it wait or fail
    db = sqlite3.connect(service.root / "state" / "journal.db", isolation_level=None)
    try:
        db.execute("BEGIN EXCLUSIVE")
        started = time.monotonic()
        code, locked = status(service)
        assert time.monotonic() - started < 5
        assert code == 0 and locked["pipelines"]["emr"]["published_today"]["files"] == 5
    finally:
        db.execute("ROLLBACK")
        db.close()

    # When the service stops, status says so (exit 3) and still shows the counts
    assert service.stop() == 0
    code, report = status(service)
    assert code == 3 and report["state"] == "not running" and report["pid"] is None
    assert report["pipelines"]["emr"]["published_today"] == {"batches": 2, "files": 5}


def test_a_stuck_service_is_degraded_and_a_killed_one_not_running(
    make_service: MakeService,
) -> None:
    """A stopped main loop (SIGSTOP) misses its heartbeats: exit 1; it recovers after SIGCONT;
    after kill -9 the journal still names its pid, but status sees it gone: exit 3."""
    service = make_service([emr()])
    service.start(env={"WATCHDOG_USEC": "2000000"})  # heartbeat every second
    assert status(service)[0] == 0

    service.signal(signal.SIGSTOP)
    try:
        wait_until(lambda: status(service)[0] == 1, 30, message="status to say degraded")
        report = status(service)[1]
        assert report["state"] == "degraded" and report["running"] and not report["healthy"]
        assert "no heartbeat" in report["problem"]
    finally:
        service.signal(signal.SIGCONT)
    wait_until(lambda: status(service)[0] == 0, 30, message="status to say running again")

    service.kill()
    code, report = status(service)
    assert (code, report["state"]) == (3, "not running")


def _seal(journal: Journal, pipeline: str, ids: list[int], prio: int, at: float) -> Batch:
    files = tuple(
        IncomingFile(i, pipeline, f"f{i}.csv", Path(f"/spool/{i}"), f"{i:064x}", 100, at)
        for i in ids
    )
    batch = Batch(f"b-{pipeline}-{ids[0]}", pipeline, "emr", prio, at, files)
    journal.seal_batch(batch, at)
    return batch


def _claim(journal: Journal, pipeline: str, count: int, at: float) -> list[int]:
    ids = journal.begin_claims(
        (pipeline, f"{pipeline}-{at}-{i}.csv", f"{pipeline}/{at}-{i}", at + i) for i in range(count)
    )
    journal.finish_claims([(i, f"{i:064x}", 100) for i in ids])
    return ids


def test_waiting_by_priority_in_flight_and_days(make_service: MakeService) -> None:
    """From a journal in a known state: sealed batches by priority, running ones, published
    today vs yesterday, and a pipeline no longer in the config."""
    service = make_service([emr(priority=2), emr(name="labs", priority=4)])
    now = time.time()
    yesterday = now - 86_400 * 1.5
    journal = Journal(service.root / "state" / "journal.db")
    try:
        _seal(journal, "emr", _claim(journal, "emr", 3, now - 100), 2, now - 90)
        _seal(journal, "emr", _claim(journal, "emr", 2, now - 80), 1, now - 70)  # after a reload
        _claim(journal, "emr", 2, now - 30)  # the open batch
        running = _seal(journal, "labs", _claim(journal, "labs", 2, now - 60), 4, now - 50)
        journal.mark_running(running.batch_id, now - 40)
        old = _seal(journal, "labs", _claim(journal, "labs", 4, yesterday), 4, yesterday)
        journal.mark_running(old.batch_id, yesterday)
        facts = {f.file_id: {"rows": 1} for f in old.files}
        journal.mark_published(
            BatchResult(old.batch_id, Path("/outbox/labs") / old.batch_id, yesterday, (), facts),
            yesterday,
        )
        _claim(journal, "gone", 1, now - 20)
    finally:
        journal.close()

    code, report = status(service)

    assert code == 3 and report["state"] == "not running"
    pipelines = report["pipelines"]
    assert list(pipelines) == ["emr", "labs", "gone"]
    emr_row, labs_row, gone_row = pipelines["emr"], pipelines["labs"], pipelines["gone"]
    assert emr_row["waiting_batches"] == {"1": 1, "2": 1}
    assert emr_row["open_batch"]["files"] == 2 and 29 <= emr_row["open_batch"]["age_s"] < 60
    assert 99 <= emr_row["oldest_waiting_s"] < 130
    assert (labs_row["in_flight"], labs_row["waiting_batches"]) == (1, {})
    assert labs_row["published_today"] == {"batches": 0, "files": 0}
    assert labs_row["published_files"] == 4
    assert (gone_row["configured"], gone_row["priority"]) == (False, None)
    text = service.run("status")
    assert text.returncode == 3
    assert "p1: 1, p2: 1" in text.stdout and "gone (removed)" in text.stdout

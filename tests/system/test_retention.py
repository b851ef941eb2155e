"""Retention, `medbatch prune` and `medbatch requeue` against the real service (a subprocess)."""

from __future__ import annotations

import random
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from daemon.audit import AuditEvent, AuditLog
from tests.support.data import emr_csv
from tests.support.waiting import wait_until
from tests.system.conftest import MakeService

BAD_BYTES = "patient_id,diagnosis\n000001,caf\xe9 au lait\n".encode("latin-1")


def emr(**extra: Any) -> dict[str, Any]:
    return {
        "name": "emr",
        "kind": "emr",
        "max_files": 10,
        "max_wait": 0.5,
        "settle_s": 0.1,
        **extra,
    }


def files_under(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.is_file()) if folder.exists() else []


def test_retention_prunes_every_kind_and_the_audit_chain_still_verifies(
    make_service: MakeService, tmp_path: Path
) -> None:
    """Old archive, quarantine (with sidecars), journal rows and an audit day two days old: the
    dry run counts them and changes nothing; the idle service prunes them, one audit line per
    kind (no names); `audit verify` passes from the checkpoint the pruned day left."""
    earlier = datetime.now(UTC) - timedelta(days=2)
    with AuditLog(tmp_path / "outbox" / "_audit", clock=earlier.timestamp) as old:
        old.append(AuditEvent.DAEMON_STARTED, pid=1, version="earlier")
        old.append(AuditEvent.DAEMON_STOPPED, pid=1)
    service = make_service([emr()])
    service.start()
    rng = random.Random(3)
    for i in range(3):
        service.drop("emr", f"MRN_{i}.csv", emr_csv(rng, rows=5))
    service.drop("emr", "MRN_latin.csv", BAD_BYTES)
    wait_until(lambda: service.accounted() == 4, 60, message="4 inputs accounted for")
    assert service.stop() == 0
    archive, quarantine = tmp_path / "state" / "archive", tmp_path / "quarantine"
    audit_folder = tmp_path / "outbox" / "_audit"
    before = (files_under(archive), files_under(quarantine), files_under(audit_folder))
    assert len(before[0]) == 3 and len(before[1]) == 2 and len(before[2]) == 2
    archived_bytes = sum(p.stat().st_size for p in before[0])

    zero = {"archive_days": 0, "quarantine_days": 0, "journal_days": 0}
    waiting = {**emr(**zero), "name": "waiting", "max_wait": 600}  # its batch stays open
    service = make_service([emr(**zero), waiting], retention={"audit_days": 1, "every_s": "1s"})
    dry = service.run("prune", "--dry-run")
    assert dry.returncode == 0, dry.stderr
    assert "archive: 3 files" in dry.stdout and "quarantine: 1 files" in dry.stdout
    assert "audit log: audit: 1 files" in dry.stdout and "journal: " in dry.stdout
    assert "MRN" not in dry.stdout
    assert (files_under(archive), files_under(quarantine), files_under(audit_folder)) == before
    assert service.journal("SELECT count(*) FROM files")[0][0] == 4

    service.start()
    service.drop("waiting", "unfinished.csv", emr_csv(rng, rows=5))
    wait_until(lambda: files_under(service.spool), 30, message="unfinished.csv spooled")
    wait_until(
        lambda: (
            not files_under(archive)
            and not files_under(quarantine)
            and service.journal("SELECT pipeline FROM files") == [("waiting",)]
            and len(list(audit_folder.glob("audit-*.jsonl"))) == 1
        ),
        60,
        message="everything past its retention pruned by the idle service",
    )
    assert len(files_under(service.spool)) == 1, "an unfinished input is never pruned"
    locked = service.run("prune")
    assert locked.returncode == 75, (locked.stdout, locked.stderr)
    assert service.stop() == 0
    pruned = [line for line in service.audit() if line["event"] == "retention.pruned"]
    assert {(p["kind"], p["files"]) for p in pruned} >= {
        ("archive", 3),
        ("quarantine", 1),
        ("journal", 4),
        ("audit", 1),
    }
    assert all("file" not in p and "MRN" not in str(p) for p in pruned)
    assert sum(p["bytes"] for p in pruned if p["kind"] == "archive") == archived_bytes
    verified = service.run("audit", "verify")
    assert verified.returncode == 0, verified.stdout
    assert "checkpoint" in verified.stdout
    again = service.run("prune")
    assert again.returncode == 0 and "nothing to prune" in again.stdout


def quarantined_copies(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if not p.name.endswith(".error.json"))


def test_requeue_publishes_a_transient_failure_and_refuses_a_deterministic_one(
    make_service: MakeService, tmp_path: Path
) -> None:
    """An input quarantined as `timeout` (3 s of work, 1 s allowed) is requeued while the service
    runs and published, `trace` showing quarantined → requeued → published; a `not_utf8` one
    is refused (exit 1) without --force and its copy stays in quarantine."""
    notes = {"name": "notes", "kind": "faulty", "max_files": 1, "max_wait": 0.5, "settle_s": 0.1}
    slow = b"note 1\nMEDBATCH-TEST-SLEEP-3\n"  # slow beyond 1 s on the first run only
    service = make_service(
        [notes, emr()], workers={"count": 1, "batch_timeout_s": 1, "max_attempts": 1}
    )
    service.start()
    sha = service.drop("notes", "visit.txt", slow)
    wait_until(lambda: service.accounted() == 1, 60, message="visit.txt quarantined")
    assert service.stop() == 0
    assert [q["reason"] for q in service.quarantined()] == ["timeout"]

    service = make_service([notes, emr()], workers={"count": 1, "batch_timeout_s": 30})
    service.start()
    service.drop("emr", "latin.csv", BAD_BYTES)
    wait_until(lambda: service.accounted() == 2, 60, message="latin.csv quarantined")
    # Quarantined under its hashed name: the operator names the copy, or the input by its name
    (latin,) = quarantined_copies(tmp_path / "quarantine" / "emr")
    assert "latin" not in latin.name
    for key in (str(latin), "latin.csv"):
        refused = service.run("requeue", key)
        assert refused.returncode == 1 and "not_utf8" in refused.stdout, refused.stdout
    assert latin.exists()

    (visit,) = quarantined_copies(tmp_path / "quarantine" / "notes")
    done = service.run("requeue", sha)
    assert done.returncode == 0, (done.stdout, done.stderr)
    assert not any((tmp_path / "quarantine" / "notes").iterdir()), "copy and sidecar went back"
    assert not visit.exists()
    wait_until(
        lambda: any(i.get("sha256") == sha for i in service.published_inputs()),
        60,
        message="the requeued input published",
    )
    wait_until(
        lambda: any(line["event"] == "file.requeued" for line in service.audit()),
        30,
        message="file.requeued written",
    )
    assert service.stop() == 0
    requeued = [line for line in service.audit() if line["event"] == "file.requeued"]
    assert len(requeued) == 1 and requeued[0]["reason"] == "timeout"
    trace = service.run("trace", sha)
    assert trace.returncode == 0, trace.stderr
    assert "state quarantined (timeout)" in trace.stdout
    assert "state published" in trace.stdout and "file.requeued" in trace.stdout
    assert trace.stdout.index("quarantined") < trace.stdout.index("state published")

    # --force sends even a deterministic refusal back (it is quarantined again, linked).
    service.start()
    forced = service.run("requeue", "--all", "--reason", "not_utf8", "--force")
    assert forced.returncode == 0, (forced.stdout, forced.stderr)
    wait_until(
        lambda: len([a for a in service.audit() if a["event"] == "file.requeued"]) == 2,
        60,
        message="the forced requeue linked",
    )
    assert service.stop() == 0
    last = [a for a in service.audit() if a["event"] == "file.requeued"][-1]
    assert last["reason"] == "not_utf8" and last["forced"] is True
    assert service.journal("SELECT count(*) FROM files WHERE reason='not_utf8'") == [(2,)]

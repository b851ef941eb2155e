"""Audit lines lost between a journal commit and their write are rebuilt from the journal."""

from __future__ import annotations

import json
from pathlib import Path

from daemon.audit import AuditEvent, AuditLog, read_lines, verify
from daemon.audit.reconcile import reconcile
from daemon.journal import Journal
from daemon.models import Batch, BatchResult, IncomingFile, Provenance, options_sha256


def claim(journal: Journal, name: str, at: float) -> IncomingFile:
    (file_id,) = journal.begin_claims([("emr", name, f"emr/{name}", at)])
    journal.finish_claims([(file_id, "ab" * 32, 10)])
    return IncomingFile(file_id, "emr", name, Path(f"/spool/{name}"), "ab" * 32, 10, at)


def test_missing_lines_are_rebuilt_once(tmp_path: Path) -> None:
    """Transitions with no line get one (marked recovered); existing lines are not repeated."""
    journal = Journal(tmp_path / "journal.db")
    audit = AuditLog(tmp_path / "audit")
    a = claim(journal, "a.csv", 1000.0)
    audit.append(AuditEvent.FILE_RECEIVED, pipeline="emr", file="a.csv", file_id=a.file_id)
    b = claim(journal, "b.csv", 1001.0)  # the service died before writing b's line
    batch = Batch("B1", "emr", "emr", 3, 1002.0, (a, b))
    journal.seal_batch(batch, opened_at=1000.0)
    journal.mark_running("B1", 1003.0)
    journal.mark_published(
        BatchResult(
            "B1",
            tmp_path / "out",
            1004.0,
            facts={a.file_id: {}},
            quarantined={b.file_id: ("bad_table", "")},
        ),
        1004.0,
    )

    assert reconcile(journal, audit, tmp_path / "audit", since=0.0) == 5
    assert reconcile(journal, audit, tmp_path / "audit", since=0.0) == 0

    lines = list(read_lines(tmp_path / "audit"))
    recovered = [
        (line["event"], line.get("file_id") or line.get("batch_id"))
        for line in lines
        if line.get("recovered")
    ]
    assert recovered[:3] == [
        ("file.received", b.file_id),
        ("batch.sealed", "B1"),
        ("batch.started", "B1"),
    ]
    assert sorted(recovered[3:], key=str) == [  # both at the publish time
        ("batch.published", "B1"),
        ("file.quarantined", b.file_id),
    ]
    assert verify(tmp_path / "audit").ok
    audit.close()
    journal.close()


def test_only_transitions_since_the_recorded_head_are_considered(tmp_path: Path) -> None:
    """What happened before `since` is taken as written: no scan of older history."""
    journal = Journal(tmp_path / "journal.db")
    audit = AuditLog(tmp_path / "audit")
    claim(journal, "old.csv", 1000.0)
    new = claim(journal, "new.csv", 5000.0)
    assert reconcile(journal, audit, tmp_path / "audit", since=4000.0) == 1
    (line,) = [line for line in read_lines(tmp_path / "audit") if line.get("recovered")]
    assert line["file_id"] == new.file_id
    audit.close()
    journal.close()


def test_a_rebuilt_published_line_carries_the_manifest_provenance(tmp_path: Path) -> None:
    """A batch.published line rebuilt after a crash says what the live one would have: the
    version, host and hashes from its manifest's provenance (and none where it has none)."""
    journal = Journal(tmp_path / "journal.db")
    audit = AuditLog(tmp_path / "audit")
    provenance = Provenance("1.2.3", "emr", {"group_by": "ward"}, "c" * 64, "node-7")
    for batch_id, with_provenance in (("B1", True), ("B2", False)):
        f = claim(journal, f"{batch_id}.csv", 1000.0)
        journal.seal_batch(Batch(batch_id, "emr", "emr", 3, 1002.0, (f,)), opened_at=1000.0)
        journal.mark_running(batch_id, 1003.0)
        folder = tmp_path / "out" / batch_id
        folder.mkdir(parents=True)
        manifest = {"provenance": provenance.as_json()} if with_provenance else {}
        (folder / "manifest.json").write_text(json.dumps(manifest))
        journal.mark_published(BatchResult(batch_id, folder, 1004.0, facts={f.file_id: {}}), 1004.0)

    reconcile(journal, audit, tmp_path / "audit", since=0.0)

    published = {
        line["batch_id"]: line
        for line in read_lines(tmp_path / "audit")
        if line["event"] == "batch.published"
    }
    assert {k: published["B1"][k] for k in ("version", "host", "config_sha256")} == {
        "version": "1.2.3",
        "host": "node-7",
        "config_sha256": "c" * 64,
    }
    assert published["B1"]["options_sha256"] == options_sha256({"group_by": "ward"})
    assert "ward" not in json.dumps(published["B1"])
    assert not {"version", "host", "config_sha256", "options_sha256"} & set(published["B2"])
    audit.close()
    journal.close()


def test_the_last_attempts_start_is_rebuilt_and_an_earlier_ones_line_kept(tmp_path: Path) -> None:
    """The journal keeps a batch's last attempt: a lost `batch.started` of that attempt is
    rebuilt (with its number), next to the earlier attempt's line that was written."""
    journal = Journal(tmp_path / "journal.db")
    audit = AuditLog(tmp_path / "audit")
    f = claim(journal, "a.csv", 1000.0)
    journal.seal_batch(Batch("B1", "emr", "emr", 3, 1002.0, (f,)), opened_at=1000.0)
    audit.append(AuditEvent.BATCH_SEALED, pipeline="emr", batch_id="B1", files=1, bytes=10)
    audit.append(AuditEvent.FILE_RECEIVED, pipeline="emr", file="a.csv", file_id=f.file_id)
    assert journal.mark_running("B1", 1003.0) == 1
    audit.append(AuditEvent.BATCH_STARTED, pipeline="emr", batch_id="B1", attempt=1)
    journal.mark_sealed_again("B1", "worker_lost")
    assert journal.mark_running("B1", 1005.0) == 2  # its line lost

    assert reconcile(journal, audit, tmp_path / "audit", since=0.0) == 1
    assert reconcile(journal, audit, tmp_path / "audit", since=0.0) == 0
    started = [
        (line["attempt"], bool(line.get("recovered")))
        for line in read_lines(tmp_path / "audit")
        if line["event"] == "batch.started"
    ]
    assert started == [(1, False), (2, True)]
    assert verify(tmp_path / "audit").ok
    audit.close()
    journal.close()

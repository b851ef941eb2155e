"""A `batch_by` batch's `batch.sealed` line, rebuilt from the journal, names its group."""

from __future__ import annotations

from pathlib import Path

from daemon.audit import AuditLog, read_lines
from daemon.audit.reconcile import reconcile
from daemon.journal import Journal
from daemon.models import Batch, IncomingFile


def test_a_rebuilt_seal_carries_the_batch_group(tmp_path: Path) -> None:
    """A `batch_by` batch's rebuilt `batch.sealed` names its group, like the live line does;
    an arrival batch's has none."""
    journal = Journal(tmp_path / "journal.db")
    audit = AuditLog(tmp_path / "audit")
    files = []
    for name, group in (("a.dcm", "series:00ff"), ("b.csv", None)):
        (file_id,) = journal.begin_claims([("emr", name, f"emr/{name}", 1000.0)])
        groups = {file_id: group} if group else None
        journal.finish_claims([(file_id, "ab" * 32, 10)], groups=groups)
        files.append(
            IncomingFile(
                file_id, "emr", name, Path(f"/x/{name}"), "ab" * 32, 10, 1000.0, group=group or ""
            )
        )
    for batch_id, incoming in (("G", files[0]), ("A", files[1])):
        batch = Batch(batch_id, "emr", "emr", 3, 1001.0, (incoming,))
        assert batch.group == (incoming.group or None)
        journal.seal_batch(batch, opened_at=1000.0)
    reconcile(journal, audit, tmp_path / "audit", since=0.0)
    sealed = {
        line["batch_id"]: line.get("group")
        for line in read_lines(tmp_path / "audit")
        if line["event"] == "batch.sealed"
    }
    assert sealed == {"G": "series:00ff", "A": None}
    audit.close()
    journal.close()

"""A local worker makes the journal durable (the batch's seal and running mark, committed
without an fsync) before anything it publishes can be seen; one that cannot publishes nothing."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest

from daemon import worker
from daemon.errors import BatchFailedError
from daemon.journal import Journal
from daemon.models import BatchTask, Reason
from tests.unit.test_processor_contract import batch_task, samples_of


def emr_task(tmp_path: Path, wal: str) -> tuple[BatchTask, Path]:
    inputs = tmp_path / "in"
    inputs.mkdir()
    samples = samples_of("emr")
    outbox = tmp_path / "outbox"
    task = batch_task("emr", [samples.valid(inputs, 1), samples.valid(inputs, 2)], outbox)
    return replace(task, journal_wal=wal), outbox


def test_the_worker_syncs_the_journal_before_its_folder_appears(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    journal = Journal(tmp_path / "journal.db")
    journal.begin_claims([("emr", "a.csv", "emr/a.csv", 1.0)], durable=False)
    task, outbox = emr_task(tmp_path, journal.wal_path)
    seen: list[tuple[str, list[str]]] = []
    real = worker.sync_file

    def spy(path: str) -> None:
        seen.append((path, sorted(p.name for p in outbox.iterdir() if not p.name.startswith("."))))
        real(path)

    monkeypatch.setattr(worker, "sync_file", spy)
    result = worker.run_batch(task)
    assert result.is_published
    assert seen == [(journal.wal_path, [])], "synced before the batch folder was renamed in"
    journal.close()


def test_a_journal_the_worker_cannot_sync_fails_the_attempt_and_publishes_nothing(
    tmp_path: Path,
) -> None:
    blocker = tmp_path / "not-a-folder"
    blocker.write_bytes(b"")
    task, outbox = emr_task(tmp_path, str(blocker / "journal.db-wal"))
    with pytest.raises(BatchFailedError) as failed:
        worker.run_batch(task)
    assert failed.value.reason == Reason.IO_ERROR
    assert [p.name for p in outbox.iterdir()] == [], "no folder, no staging left behind"

"""Batcher: sealing by count, bytes and age, with an injected clock."""

from __future__ import annotations

from pathlib import Path

from daemon.batcher import Batcher, batch_id_for
from daemon.config import Pipeline
from daemon.models import IncomingFile


def pipeline(**overrides: object) -> Pipeline:
    values: dict[str, object] = {
        "name": "emr",
        "kind": "emr",
        "max_files": 3,
        "max_bytes": 1000,
        "max_wait": 10.0,
    }
    values.update(overrides)
    return Pipeline.model_validate(values)


def incoming(file_id: int, size: int = 10, at: float = 100.0, name: str = "emr") -> IncomingFile:
    return IncomingFile(
        file_id, name, f"f{file_id}.csv", Path(f"/spool/{file_id}"), "0" * 64, size, at
    )


def test_seals_at_max_files() -> None:
    """The third file of a max_files=3 pipeline seals the batch with all three."""
    batcher = Batcher({"emr": pipeline()})
    assert batcher.add(incoming(1), 100) == []
    assert batcher.add(incoming(2), 100) == []
    (sealed,) = batcher.add(incoming(3), 100)
    assert [f.file_id for f in sealed.batch.files] == [1, 2, 3]
    assert batcher.open_batches() == {}


def test_a_file_that_would_overflow_max_bytes_starts_a_new_batch() -> None:
    """A file that would push the batch past max_bytes seals the batch before it."""
    batcher = Batcher({"emr": pipeline(max_files=100)})
    batcher.add(incoming(1, size=600), 100)
    (sealed,) = batcher.add(incoming(2, size=600), 100)
    assert [f.file_id for f in sealed.batch.files] == [1]
    assert [f.file_id for f in batcher.open_batches()[("emr", "")].files] == [2]


def test_a_file_larger_than_max_bytes_is_a_batch_of_its_own() -> None:
    """A single file over max_bytes is sealed alone at once."""
    batcher = Batcher({"emr": pipeline(max_files=100)})
    (sealed,) = batcher.add(incoming(1, size=5000), 100)
    assert len(sealed.batch.files) == 1


def test_max_wait_counts_from_the_first_files_arrival() -> None:
    """The window starts at the first file's recorded arrival, not when the batcher saw it."""
    batcher = Batcher({"emr": pipeline()})
    batcher.add(incoming(1, at=100.0), now=107.0)  # e.g. re-batched after a restart
    assert batcher.open_batches()[("emr", "")].deadline == 110.0
    assert batcher.seal_due(109.9) == []
    (sealed,) = batcher.seal_due(110.0)
    assert sealed.opened_at == 100.0
    assert sealed.batch.sealed_at == 110.0


def test_pipelines_batch_separately() -> None:
    """Each pipeline has its own open batch."""
    batcher = Batcher({"emr": pipeline(), "lab": pipeline(name="lab")})
    batcher.add(incoming(1), 100)
    batcher.add(incoming(2, name="lab"), 100)
    assert set(batcher.open_batches()) == {("emr", ""), ("lab", "")}
    assert len(batcher.seal_all(100)) == 2


def test_reconfigure_applies_new_limits_to_open_batches() -> None:
    """A reload that shortens max_wait makes an open batch due sooner; its files stay."""
    batcher = Batcher({"emr": pipeline()})
    batcher.add(incoming(1, at=100.0), 100.0)
    batcher.reconfigure({"emr": pipeline(max_wait=2.0)})
    assert [len(s.batch.files) for s in batcher.seal_due(102.0)] == [1]


def test_batch_ids_sort_by_time_and_depend_on_members() -> None:
    """Ids are YYYYMMDDTHHMMSSZ-<pipeline>-<8 hex>, fixed by the members."""
    files = [incoming(1), incoming(2)]
    first = batch_id_for("emr", 0.0, files)
    assert first.startswith("19700101T000000Z-emr-") and len(first.split("-")[-1]) == 8
    assert first == batch_id_for("emr", 0.0, list(files))
    assert first != batch_id_for("emr", 0.0, [incoming(3)])
    assert batch_id_for("emr", 86400.0, files) > first

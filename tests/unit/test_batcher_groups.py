"""Batcher in a `batch_by` pipeline: one window per series or study, sealed once stable, with an
injected clock."""

from __future__ import annotations

from pathlib import Path

import pytest

from daemon.batcher import Batcher, Sealed
from daemon.config import Pipeline
from daemon.models import UNKNOWN_GROUP, IncomingFile

SERIES_A = "series:aaaa"
SERIES_B = "series:bbbb"


def pipeline(**overrides: object) -> Pipeline:
    values: dict[str, object] = {
        "name": "ct",
        "kind": "imaging",
        "batch_by": "series",
        "stable_s": 5.0,
        "max_files": 100,
        "max_bytes": 10_000,
        "max_wait": 60.0,
    }
    values.update(overrides)
    return Pipeline.model_validate(values)


def instance(file_id: int, group: str, at: float, size: int = 10) -> IncomingFile:
    return IncomingFile(
        file_id, "ct", f"i{file_id}.dcm", Path(f"/spool/{file_id}"), "0" * 64, size, at,
        group=group,
    )  # fmt: skip


def members(sealed: list[Sealed]) -> list[list[int]]:
    return [[f.file_id for f in s.batch.files] for s in sealed]


def test_interleaved_series_make_one_batch_each_once_stable() -> None:
    """Instances of two series alternating: two windows, each sealed stable_s after its last."""
    batcher = Batcher({"ct": pipeline()})
    for i in range(6):
        group = SERIES_A if i % 2 == 0 else SERIES_B
        assert batcher.add(instance(i, group, at=100.0 + i), now=100.0 + i) == []
    # A's last instance came at 104, B's at 105: each is stable 5 s later, not before.
    assert batcher.seal_due(108.9) == []
    assert members(batcher.seal_due(109.0)) == [[0, 2, 4]]
    assert batcher.seal_due(109.9) == []
    assert members(batcher.seal_due(110.0)) == [[1, 3, 5]]
    assert batcher.open_batches() == {}


def test_each_instance_restarts_the_stable_clock() -> None:
    """A series still arriving stays open past stable_s from its first instance."""
    batcher = Batcher({"ct": pipeline()})
    for i, at in enumerate([100.0, 104.0, 108.0, 112.0]):
        batcher.add(instance(i, SERIES_A, at=at), now=at)
        assert batcher.seal_due(at + 4.9) == []
    assert members(batcher.seal_due(117.0)) == [[0, 1, 2, 3]]


def test_max_wait_is_the_ceiling_from_the_first_instance() -> None:
    """A series that never goes quiet is sealed max_wait after its first instance."""
    batcher = Batcher({"ct": pipeline(max_wait=10.0)})
    for i in range(6):
        batcher.add(instance(i, SERIES_A, at=100.0 + 2 * i), now=100.0 + 2 * i)
    assert batcher.open_batches()[("ct", SERIES_A)].deadline == 110.0
    assert members(batcher.seal_due(110.0)) == [[0, 1, 2, 3, 4, 5]]


@pytest.mark.parametrize(("limit", "size"), [({"max_files": 3}, 10), ({"max_bytes": 30}, 10)])
def test_limits_split_a_long_series_into_consecutive_batches(
    limit: dict[str, int], size: int
) -> None:
    """max_files / max_bytes cut a series into consecutive batches; another series is apart."""
    batcher = Batcher({"ct": pipeline(**limit)})
    sealed: list[Sealed] = []
    for i in range(7):
        sealed += batcher.add(instance(i, SERIES_A, at=100.0 + i, size=size), now=100.0 + i)
        if i == 3:
            sealed += batcher.add(instance(100, SERIES_B, at=103.5), now=103.5)
    assert members(sealed) == [[0, 1, 2], [3, 4, 5]]
    assert members(batcher.seal_all(200.0)) == [[100], [6]]


def test_unknown_group_goes_by_arrival() -> None:
    """Files with no series (not DICOM, unreadable) share one window timed by max_wait alone."""
    batcher = Batcher({"ct": pipeline(max_wait=20.0)})
    batcher.add(instance(1, UNKNOWN_GROUP, at=100.0), now=100.0)
    batcher.add(instance(2, SERIES_A, at=100.0), now=100.0)
    batcher.add(instance(3, UNKNOWN_GROUP, at=101.0), now=101.0)
    assert members(batcher.seal_due(105.0)) == [[2]]  # the series is stable
    assert batcher.seal_due(119.9) == []  # unknown files wait for max_wait, like arrival
    assert members(batcher.seal_due(120.0)) == [[1, 3]]


def test_groups_are_ignored_by_an_arrival_pipeline() -> None:
    """A pipeline without batch_by keeps one window, whatever group its files carry (recovered
    rows of a pipeline whose batch_by a reload removed)."""
    batcher = Batcher({"ct": pipeline(batch_by="arrival")})
    batcher.add(instance(1, SERIES_A, at=100.0), now=100.0)
    batcher.add(instance(2, SERIES_B, at=100.0), now=100.0)
    assert list(batcher.open_batches()) == [("ct", "")]
    assert batcher.seal_due(159.9) == []
    assert members(batcher.seal_due(160.0)) == [[1, 2]]


def test_recovered_window_keeps_its_timing() -> None:
    """Re-added after a restart (now later than arrival): sealed at the original stable time."""
    batcher = Batcher({"ct": pipeline()})
    batcher.add(instance(1, SERIES_A, at=100.0), now=103.0)
    batcher.add(instance(2, SERIES_A, at=102.0), now=103.0)
    assert batcher.open_batches()[("ct", SERIES_A)].deadline == 107.0
    assert batcher.seal_due(106.9) == []
    (sealed,) = batcher.seal_due(107.0)
    assert sealed.opened_at == 100.0


def test_study_groups_like_series() -> None:
    """batch_by = "study" windows by the study key the intake gave each file."""
    batcher = Batcher({"ct": pipeline(batch_by="study")})
    batcher.add(instance(1, "study:1111", at=100.0), now=100.0)
    batcher.add(instance(2, "study:2222", at=100.0), now=100.0)
    batcher.add(instance(3, "study:1111", at=101.0), now=101.0)
    assert members(batcher.seal_all(101.0)) == [[1, 3], [2]]


def test_reload_shortening_stable_s_applies_to_open_windows() -> None:
    """A reload that lowers stable_s seals a window that is now stable."""
    batcher = Batcher({"ct": pipeline()})
    batcher.add(instance(1, SERIES_A, at=100.0), now=100.0)
    batcher.reconfigure({"ct": pipeline(stable_s=1.0)})
    assert members(batcher.seal_due(101.0)) == [[1]]

"""Rollups: exact merging from partial statistics, small-cell suppression, and each batch merged
exactly once whatever step a crash interrupts (stage → commit → state → table → unstage)."""

from __future__ import annotations

import csv
import io
import json
import random
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from daemon.config import Pipeline
from daemon.models import Batch, BatchResult, BatchState
from daemon.rollup import Period, Rollups, merge_parts, render_csv

SPEC = {
    "group_by": "diagnosis",
    "missing": "row",
    "statistics": ["mean", "std", "min", "max"],
    "with_n": True,
    "min_cell_size": 3,
    "min_cell_sources": 1,
    "columns": ["age"],
}


def parts_of(values: list[float]) -> list[Any]:
    if not values:
        return [0, 0.0, 0.0, None, None]
    a = np.asarray(values)
    return [
        len(a),
        float(a.sum()),
        float(((a - a.mean()) ** 2).sum()),
        float(a.min()),
        float(a.max()),
    ]


def partial(groups: dict[str, list[float]], spec: dict[str, Any] = SPEC) -> dict[str, Any]:
    return {
        "spec": spec,
        "groups": {
            g: {"label": g, "n": len(v), "sources": 1, "columns": {"age": parts_of(v)}}
            for g, v in groups.items()
        },
    }


@pytest.mark.parametrize("seed", range(6))
def test_merged_parts_equal_the_statistics_of_all_values(seed: int) -> None:
    """Any split of the values, merged in any order, gives numpy's count, mean, variance, min
    and max of the whole (within 1e-9), also with empty and one-value pieces."""
    rng = random.Random(seed)
    values = [rng.uniform(-1e3, 1e6) for _ in range(rng.randint(1, 300))]
    cuts = sorted(rng.sample(range(len(values) + 1), k=min(5, len(values) + 1)))
    pieces = [values[a:b] for a, b in zip([0, *cuts], [*cuts, len(values)], strict=True)]
    rng.shuffle(pieces)
    total = parts_of([])
    for piece in pieces:
        total = merge_parts(total, parts_of(piece))
    a = np.asarray(values)
    assert total[0] == len(a)
    np.testing.assert_allclose(total[1] / total[0], a.mean(), rtol=1e-9)
    np.testing.assert_allclose(total[2] / total[0], a.var(), rtol=1e-9, atol=1e-9)
    assert (total[3], total[4]) == (a.min(), a.max())


def table(period: Period) -> list[dict[str, str]]:
    return list(csv.DictReader(io.StringIO(render_csv(period))))


def test_a_batch_is_merged_once_and_small_cells_are_suppressed() -> None:
    """Adding the same batch twice changes nothing; a group under min_cell_size (and, as it is
    the only one, the next smallest) is published with label and numbers withheld, last."""
    period = Period()
    assert period.add("B1", partial({"asthma": [30, 40, 50, 60], "copd": [1, 2], "flu": [5] * 9}))
    assert not period.add("B1", partial({"asthma": [99] * 50}))
    assert period.add("B2", partial({"asthma": [70], "flu": [6]}))
    rows = table(period)
    assert [r["diagnosis"] for r in rows] == ["flu", "", ""]
    assert [r["suppressed"] for r in rows] == ["false", "true", "true"]
    flu = rows[0]
    assert (flu["n"], flu["n_age"], flu["min_age"], flu["max_age"]) == ("10", "10", "5.0", "6.0")
    assert float(flu["mean_age"]) == pytest.approx(5.1)
    assert all(v == "" for r in rows[1:] for k, v in r.items() if k != "suppressed")
    assert period.batches == ["B1", "B2"]


def test_labels_are_quoted_and_neutralised_as_published() -> None:
    """The label the worker neutralised is what the table shows, quoted (a comma, a quote, a
    newline stay inside their cell)."""
    period = Period()
    g = {"label": "'=cmd|x", "n": 5, "sources": 1, "columns": {"age": parts_of([1, 2, 3, 4, 5])}}
    odd = {"label": 'a,"b"\nc', "n": 5, "sources": 1, "columns": {"age": parts_of([1] * 5)}}
    period.add("B1", {"spec": SPEC, "groups": {"=cmd|x": g, "odd": odd}})
    assert [r["diagnosis"] for r in table(period)] == ["'=cmd|x", 'a,"b"\nc']


# -- the store: stage, merge, recover ---------------------------------------------------------


def pipeline(rollup: str | None = "all") -> Pipeline:
    return Pipeline(name="emr", kind="emr", rollup=rollup)


def make(tmp_path: Path, rollup: str | None = "all") -> Rollups:
    for folder in ("state", "outbox"):
        (tmp_path / folder).mkdir(exist_ok=True)
    pipelines = {"emr": pipeline(rollup)}
    return Rollups(tmp_path / "state", tmp_path / "outbox", lambda: pipelines)


def publish(rollups: Rollups, batch_id: str, groups: dict[str, list[float]], at: float) -> None:
    batch = Batch(batch_id, "emr", "emr", 3, at, ())
    rollups.stage(batch, BatchResult(batch_id, Path("/x"), at, rollup=partial(groups)))


def published(tmp_path: Path, period: str = "all") -> tuple[list[str], list[dict[str, str]]]:
    folder = tmp_path / "outbox" / "emr" / "_rollup"
    about = json.loads((folder / f"{period}.json").read_text())
    text = (folder / f"{period}.csv").read_text(encoding="utf-8")
    return about["batches"], list(csv.DictReader(io.StringIO(text)))


def test_a_crash_between_commit_and_merge_is_finished_at_start(tmp_path: Path) -> None:
    """Staged, committed, not merged (kill -9): `recover` merges it once; a second recover, or
    a late merge of the same batch, counts nothing twice."""
    rollups = make(tmp_path)
    publish(rollups, "B1", {"flu": [1, 2, 3]}, 1000.0)
    rollups.merge("emr", "B1")
    publish(rollups, "B2", {"flu": [4, 5, 6]}, 1001.0)  # … and the service dies here

    states = {"B1": BatchState.PUBLISHED, "B2": BatchState.PUBLISHED}
    assert make(tmp_path).recover(states.get) == 1
    assert make(tmp_path).recover(states.get) == 0
    assert not make(tmp_path).merge("emr", "B2")
    batches, rows = published(tmp_path)
    assert batches == ["B1", "B2"]
    assert (rows[0]["n"], rows[0]["mean_age"]) == ("6", "3.5")


def test_a_crash_after_the_state_was_written_does_not_count_twice(tmp_path: Path) -> None:
    """The state covers the batch but its staged file is still there (and the table may be
    stale): recover re-publishes the table from the state and drops the staged file."""
    rollups = make(tmp_path)
    publish(rollups, "B1", {"flu": [1, 2, 3]}, 1000.0)
    staged = tmp_path / "state" / "rollup" / "emr" / "staged" / "B1.json"
    kept = staged.read_bytes()
    rollups.merge("emr", "B1")
    staged.write_bytes(kept)  # as if the unlink never happened
    (tmp_path / "outbox" / "emr" / "_rollup" / "all.json").unlink()  # nor the table's json

    make(tmp_path).recover({"B1": BatchState.PUBLISHED}.get)
    batches, rows = published(tmp_path)
    assert batches == ["B1"] and rows[0]["n"] == "3"
    assert not staged.exists()


@pytest.mark.parametrize(
    ("state", "is_kept"),
    [(BatchState.RUNNING, True), (BatchState.SEALED, True), (BatchState.FAILED, False),
     (BatchState.SPLIT, False), (None, False)],
)  # fmt: skip
def test_staged_share_of_an_unpublished_batch(
    tmp_path: Path, state: BatchState | None, is_kept: bool
) -> None:
    """A batch that may still publish keeps its staged share (its re-run stages it again); one
    that never will loses it; neither reaches the table."""
    rollups = make(tmp_path)
    publish(rollups, "B1", {"flu": [1, 2, 3]}, 1000.0)
    assert rollups.recover({"B1": state}.get) == 0
    assert (tmp_path / "state" / "rollup" / "emr" / "staged" / "B1.json").exists() == is_kept
    assert not (tmp_path / "outbox" / "emr" / "_rollup").exists()


def test_day_periods_follow_the_utc_day_of_publish(tmp_path: Path) -> None:
    """`rollup = "day"`: a batch published at 23:59:59 UTC and one at 00:00:01 land in two
    tables, each naming its own batch."""
    rollups = make(tmp_path, "day")
    for batch_id, at in (("B1", 1764633599.0), ("B2", 1764633601.0)):  # 2025-12-01/02 UTC
        publish(rollups, batch_id, {"flu": [1, 2, 3]}, at)
        rollups.merge("emr", batch_id)
    assert published(tmp_path, "2025-12-01")[0] == ["B1"]
    assert published(tmp_path, "2025-12-02")[0] == ["B2"]


def test_nothing_is_staged_for_a_pipeline_without_rollup(tmp_path: Path) -> None:
    """Rollup off (or turned off by a reload): no state, no table."""
    rollups = make(tmp_path, None)
    publish(rollups, "B1", {"flu": [1, 2, 3]}, 1000.0)
    assert not rollups.merge("emr", "B1")
    assert not (tmp_path / "state" / "rollup").exists()


def test_state_is_private_and_tables_group_readable(tmp_path: Path) -> None:
    """Sums of small groups stay the service's (0700/0600); the table is published as batch
    folders are (0750/0640)."""
    rollups = make(tmp_path)
    publish(rollups, "B1", {"flu": [1, 2, 3]}, 1000.0)
    rollups.merge("emr", "B1")
    root = tmp_path / "state" / "rollup"
    assert {p.stat().st_mode & 0o777 for p in [root, *root.rglob("*")] if p.is_dir()} == {0o700}
    assert {p.stat().st_mode & 0o777 for p in root.rglob("*") if p.is_file()} == {0o600}
    folder = tmp_path / "outbox" / "emr" / "_rollup"
    assert folder.stat().st_mode & 0o777 == 0o750
    assert {p.stat().st_mode & 0o777 for p in folder.iterdir()} == {0o640}


def test_a_share_left_staged_by_a_failed_merge_joins_with_the_next(tmp_path: Path) -> None:
    """A merge that failed (disk full) leaves its share staged; the next publish of the
    pipeline merges both, without waiting for a restart."""
    rollups = make(tmp_path)
    states = {"B1": BatchState.PUBLISHED, "B2": BatchState.PUBLISHED, "B3": BatchState.RUNNING}
    publish(rollups, "B1", {"flu": [1, 2, 3]}, 1000.0)  # its merge failed
    publish(rollups, "B3", {"flu": [7, 8, 9]}, 1000.5)  # staged, then its commit failed
    publish(rollups, "B2", {"flu": [4, 5, 6]}, 1001.0)
    assert rollups.merge_staged("emr", states.get) == 2
    assert published(tmp_path)[0] == ["B1", "B2"]


@pytest.mark.parametrize(("key", "value"), [("group_by", "ward"), ("missing", "column")])
def test_a_change_of_grouping_starts_the_table_over(tmp_path: Path, key: str, value: str) -> None:
    """Groups of another column (or counted another way) never add up with the earlier ones:
    the table starts over from that batch and its json says where."""
    rollups = make(tmp_path)
    publish(rollups, "B1", {"flu": [1, 2, 3]}, 1000.0)
    rollups.merge("emr", "B1")
    batch = Batch("B2", "emr", "emr", 3, 1001.0, ())
    changed = partial({"w1": [4, 5, 6]}, {**SPEC, "missing": "row", key: value})
    rollups.stage(batch, BatchResult("B2", Path("/x"), 1001.0, rollup=changed))
    rollups.merge("emr", "B2")
    batches, rows = published(tmp_path)
    assert batches == ["B2"]
    group = value if key == "group_by" else "diagnosis"
    assert [r[group] for r in rows] == ["w1"]
    about = json.loads((tmp_path / "outbox" / "emr" / "_rollup" / "all.json").read_text())
    assert about["restarted_at"] == "B2"

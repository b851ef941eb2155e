"""The EMR batch's share of a rollup: plain JSON with exact per-group parts, labels neutralised
as published, configured columns always listed, never an identifier column."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from daemon.processors.emr import EmrProcessor
from daemon.processors.options import EmrOptions
from daemon.rollup import Period, render_csv


def share(tmp_path: Path, tables: list[str], **options: Any) -> dict[str, Any]:
    proc = EmrProcessor(EmrOptions(**options))
    partials = []
    for i, text in enumerate(tables):
        path = tmp_path / f"in{i}.csv"
        path.write_text(text)
        partials.append(proc.read(path, path.name)[0])
    result = proc.rollup_partial(proc.merge(partials))
    return dict(json.loads(json.dumps(result)))  # what crosses to the main process


def test_parts_are_exact_and_json_plain(tmp_path: Path) -> None:
    """count, sum, M2, min and max per group and column over all files; a value missing in one
    column leaves the row out (missing = "row"); identifiers are never a column."""
    tables = [
        "patient_id,diagnosis,age,bp\n1,flu,30,120\n2,flu,40,\n3,copd,50,130\n",
        "patient_id,diagnosis,age,bp\n4,flu,35,125\n5,copd,55,135.5\n",
    ]
    got = share(tmp_path, tables, statistics=("mean", "std", "median"))
    assert got["spec"]["statistics"] == ["mean", "std"]  # the median cannot be merged
    assert got["spec"]["columns"] == ["age", "bp"]
    flu = got["groups"]["flu"]
    assert (flu["n"], flu["sources"]) == (2, 2)
    ages = np.array([30.0, 35.0])
    count, total, m2, lo, hi = flu["columns"]["age"]
    assert (count, total, lo, hi) == (2, 65.0, 30.0, 35.0)
    assert m2 == pytest.approx(((ages - ages.mean()) ** 2).sum(), rel=1e-12)
    assert "patient_id" not in json.dumps(got)


@pytest.mark.parametrize("label", ["=SUM(A1)", "+1", "-x", "@here", " =cmd"])
def test_formula_labels_are_neutralised_for_the_table(tmp_path: Path, label: str) -> None:
    """A label a spreadsheet would run is published with its leading quote, as in result.csv."""
    rows = "".join(f"{i},{label},{20 + i}\n" for i in range(12))
    got = share(tmp_path, [f"patient_id,diagnosis,age\n{rows}"])
    (group,) = got["groups"].values()
    assert group["label"].startswith("'")
    period = Period()
    period.add("B1", got)
    assert render_csv(period).splitlines()[1].startswith("\"'")


def test_configured_columns_are_listed_even_when_absent(tmp_path: Path) -> None:
    """`columns` names a column no file of the batch had: it is still in the spec, so the
    rollup's layout does not change between batches."""
    rows = "".join(f"{i},flu,{20 + i}\n" for i in range(12))
    got = share(tmp_path, [f"patient_id,diagnosis,age\n{rows}"], columns=("age", "glucose"))
    assert got["spec"]["columns"] == ["age", "glucose"]
    assert set(got["groups"]["flu"]["columns"]) == {"age"}
    period = Period()
    period.add("B1", got)
    assert "mean_glucose" in render_csv(period).splitlines()[0]

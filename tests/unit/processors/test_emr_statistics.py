"""EMR statistics by choice, checked against pandas computed independently: mean, std, min, max
exact across files and pieces; median and quantiles within a batch; listwise or per-column
missing values; unparsable values counted; a stable schema."""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest

from daemon.processors.emr import EmrProcessor
from daemon.processors.options import EmrOptions
from tests.unit.processors.emr_run import emr_result

STATISTICS = ("n", "mean", "std", "min", "max", "median", "p90", "p5")


def make_tables(seed: int, files: int = 3, rows: int = 400) -> list[bytes]:
    rng = np.random.default_rng(seed)
    tables = []
    for _ in range(files):
        frame = pd.DataFrame(
            {
                "patient_id": [f"P{i:06d}" for i in rng.integers(0, 10**6, rows)],
                "diagnosis": rng.choice(["asthma", "copd", "flu"], rows),
                "ward_code": rng.integers(1, 9, rows),
                "age": rng.integers(1, 99, rows).astype(float),
                "glucose": rng.normal(7, 2, rows).round(3),
            }
        )
        frame.loc[rng.random(rows) < 0.1, "age"] = np.nan
        frame.loc[rng.random(rows) < 0.2, "glucose"] = np.nan
        tables.append(frame.to_csv(index=False).encode())
    return tables


def run(tmp_path: Path, tables: list[bytes], **options: Any) -> tuple[pd.DataFrame, list[Any]]:
    result, facts = emr_result(tmp_path, tables, min_cell_size=1, **options)
    return pd.read_csv(result, keep_default_na=True), facts


def expected(frame: pd.DataFrame, column: str, statistic: str) -> pd.Series:
    grouped = frame.groupby("diagnosis")[column]
    if statistic == "n":
        return grouped.count().astype(float)
    if statistic[0] == "p":
        return grouped.quantile(int(statistic[1:]) / 100)
    return grouped.agg(statistic)


@pytest.mark.parametrize("missing", ["row", "column"])
def test_every_statistic_equals_pandas_over_files_and_pieces(tmp_path: Path, missing: str) -> None:
    """Three files, each read in many pieces (a 1 KiB row limit makes 2 KiB blocks): every
    statistic of every column equals pandas over the concatenated rows."""
    tables = make_tables(1)
    result, _ = run(tmp_path, tables, statistics=STATISTICS, missing=missing, max_row_bytes=1024)
    frame = pd.concat([pd.read_csv(io.BytesIO(t)) for t in tables])
    if missing == "row":
        frame = frame.dropna()
    result = result.set_index("diagnosis")
    assert list(result.index) == ["asthma", "copd", "flu"]
    for column in ("age", "glucose"):
        for statistic in STATISTICS:
            got = result[f"{statistic}_{column}" if statistic != "n" else f"n_{column}"]
            want = expected(frame, column, statistic)
            np.testing.assert_allclose(got.to_numpy(float), want.to_numpy(), rtol=1e-10)
    assert (result["n"].to_numpy() == frame.groupby("diagnosis").size().to_numpy()).all()
    assert not any("ward_code" in c or "patient_id" in c for c in result.columns)
    assert result["suppressed"].dtype == bool and not result["suppressed"].any()


@pytest.mark.parametrize("split", [1, 2, 5])
def test_merge_is_exact_however_the_batch_is_split(tmp_path: Path, split: int) -> None:
    """std from merged partials (Chan's formula) equals the one-pass value whatever the split."""
    proc = EmrProcessor(EmrOptions(min_cell_size=1, statistics=("mean", "std", "min", "max")))
    path = tmp_path / "all.csv"
    path.write_bytes(b"".join(make_tables(2, files=1, rows=1000)))
    whole, _ = proc.read(path, "all.csv")
    frame = pd.read_csv(path)
    parts = []
    for i, rows in enumerate(np.array_split(np.arange(len(frame)), split)):
        part = tmp_path / f"p{i}.csv"
        frame.iloc[rows].to_csv(part, index=False)
        parts.append(proc.read(part, part.name)[0])
    merged = proc.merge(parts)
    for name in ("count:age", "sum:age", "m2:age", "min:age", "max:age"):
        np.testing.assert_allclose(merged[name], whole[name].loc[merged.index], rtol=1e-9)


def test_unparsable_values_are_counted_and_text_columns_named(tmp_path: Path) -> None:
    """`<0.5` in a lab column: counted as unparsed, the column kept; a free-text column is
    named as non-numeric; neither silently."""
    lines = ["diagnosis,crp,note"] + [f"flu,{v},{t}" for v, t in
             [("1.5", "ok"), ("<0.5", "fine"), ("2.5", "x"), (">200", "y"), ("3", "")]]  # fmt: skip
    result, (facts,) = run(tmp_path, [("\n".join(lines) + "\n").encode()], missing="column")
    assert facts["unparsed:crp"] == 2
    assert facts["non_numeric"] == "note"
    assert list(result.columns) == ["diagnosis", "n", "n_crp", "mean_crp", "suppressed"]
    assert result["mean_crp"].iloc[0] == pytest.approx((1.5 + 2.5 + 3) / 3)


def test_configured_columns_are_always_present(tmp_path: Path) -> None:
    """`columns` fixes the schema: a column no file has still appears, empty."""
    tables = [b"diagnosis,age\nflu,3\n"]
    result, _ = run(tmp_path, tables, columns=("age", "glucose"), statistics=("mean", "max"))
    assert list(result.columns) == [
        "diagnosis", "n", "mean_age", "max_age", "mean_glucose", "max_glucose", "suppressed"
    ]  # fmt: skip
    assert np.isnan(result["mean_glucose"].iloc[0])


@pytest.mark.parametrize("bad", [("mode",), ("p0",), ("p100",), ("mean", "avg"), ()])
def test_unknown_statistics_are_refused(bad: tuple[str, ...]) -> None:
    with pytest.raises(ValueError, match="statistics"):
        EmrOptions(statistics=bad)


def test_quantiles_hold_values_within_a_bound(tmp_path: Path) -> None:
    """A median needs every value: an input past max_quantile_values is refused, not swapped."""
    from daemon.errors import ProcessorError

    content = b"diagnosis,age,glucose\n" + b"flu,1,2\n" * 600
    with pytest.raises(ProcessorError) as info:
        run(tmp_path, [content], statistics=("median",), max_quantile_values=1000)
    assert info.value.reason == "too_many_values"
    result, _ = run(tmp_path, [content], statistics=("mean",), max_quantile_values=1000)
    assert result["mean_age"].iloc[0] == 1.0

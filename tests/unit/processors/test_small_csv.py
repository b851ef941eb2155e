"""`write_small_csv` (imaging's result.csv and series.csv without pandas) writes the bytes
pandas wrote before it, for every kind of cell: missing, NaN, numpy scalars, extreme floats,
formula-like, quoted and multi-line text."""

from __future__ import annotations

import csv
import math
import random
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from daemon.processors.imaging import COLUMNS, FLOAT_COLUMNS, INT_COLUMNS, TEXT_COLUMNS
from daemon.processors.tables import neutralise, write_small_csv

TEXTS = ["", "plain", "=SUM(A1)", "+1", "-2", "@x", "\tx", " =hidden", "\uff1dx", 'a "q", b',
         "line\nbreak", "cr\rinside", "ünï©ødé", "1,2", "'already", "nan", "None"]  # fmt: skip
FLOATS = [0.0, -0.0, 1.5, 1 / 3, 1e-300, 1e300, 2**53 + 1.0, float("inf"), float("-inf"),
          float("nan"), np.float64(2.5), np.float32(0.1), np.float64("nan"), 7]  # fmt: skip
INTS = [0, 1, -1, 2**31, 2**62, np.int64(5), np.uint16(65535), True, 3.0]


def pandas_bytes(path: Path, rows: list[dict[str, object]]) -> bytes:
    """What imaging wrote with pandas before (the same steps, cast by cast)."""
    table = pd.DataFrame(rows, columns=list(COLUMNS))
    for column in INT_COLUMNS:
        table[column] = table[column].astype("Int64")
    for column in FLOAT_COLUMNS:
        table[column] = table[column].astype("float64")
    for column in TEXT_COLUMNS:
        table[column] = table[column].map(neutralise, na_action="ignore")
    table.to_csv(path, index=False, quoting=csv.QUOTE_NONNUMERIC, lineterminator="\n")
    return path.read_bytes()


def random_rows(rng: random.Random, n: int) -> list[dict[str, object]]:
    rows = []
    for _ in range(n):
        row: dict[str, object] = {}
        for column in COLUMNS:
            if rng.random() < 0.2:
                continue  # a missing key
            if rng.random() < 0.1:
                row[column] = None
            elif column in INT_COLUMNS:
                row[column] = rng.choice(INTS)
            elif column in FLOAT_COLUMNS:
                row[column] = rng.choice(FLOATS)
            else:
                row[column] = rng.choice(TEXTS)
        rows.append(row)
    return rows


@pytest.mark.parametrize("seed", range(8))
def test_the_bytes_equal_what_pandas_wrote(tmp_path: Path, seed: int) -> None:
    rows = random_rows(random.Random(seed), 60)
    ours = tmp_path / "ours.csv"
    write_small_csv(ours, rows, COLUMNS, ints=INT_COLUMNS, floats=FLOAT_COLUMNS)
    assert ours.read_bytes() == pandas_bytes(tmp_path / "pandas.csv", rows)


def test_an_empty_table_is_its_header(tmp_path: Path) -> None:
    ours = tmp_path / "ours.csv"
    write_small_csv(ours, [], COLUMNS, ints=INT_COLUMNS, floats=FLOAT_COLUMNS)
    assert ours.read_bytes() == pandas_bytes(tmp_path / "pandas.csv", [])


def test_missing_numbers_read_back_as_missing(tmp_path: Path) -> None:
    rows = [{"tile": None, "mean": float("nan"), "source": None}, {"tile": 2, "mean": 1.25}]
    ours = tmp_path / "ours.csv"
    write_small_csv(ours, rows, COLUMNS, ints=INT_COLUMNS, floats=FLOAT_COLUMNS)
    back = pd.read_csv(ours)
    assert back["tile"].isna().tolist() == [True, False] and back["tile"].iloc[1] == 2
    assert math.isnan(back["mean"].iloc[0]) and back["mean"].iloc[1] == 1.25

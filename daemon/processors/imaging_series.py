"""Per-series rows of an imaging batch (`series.csv`): instances, frames, modality, and the series
description only where a pipeline allows it (free text can name a patient). Runs in workers.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from daemon.processors.tables import write_small_csv

Row = dict[str, str | int | float | None]

SERIES_NAME = "series.csv"
# The row keys the DICOM reader adds for this module; never columns of result.csv.
SERIES_KEY = "_series"  # a digest of SeriesInstanceUID: tells series apart inside the worker
DESCRIPTION_KEY = "_series_description"
SERIES_COLUMNS = (
    "series", "series_number", "modality", "instances", "frames", "first_instance",
    "last_instance", "series_description",
)  # fmt: skip
_INT_COLUMNS = ("series", "series_number", "instances", "frames", "first_instance",
                "last_instance")  # fmt: skip


def number_series(rows: Sequence[Row]) -> dict[str, int]:
    """Each series of the batch numbered 1.. in the order its first row comes (rows are in
    clinical order, so any split of the batch numbers them alike)."""
    numbers: dict[str, int] = {}
    for row in rows:
        key = row.get(SERIES_KEY)
        if isinstance(key, str) and key not in numbers:
            numbers[key] = len(numbers) + 1
    return numbers


def series_rows(rows: Sequence[Row], numbers: dict[str, int]) -> list[Row]:
    """One row per series: its images (a multi-frame image counts once) and their frames."""
    out: dict[str, Row] = {}
    seen: set[tuple[str, object, object]] = set()
    for row in rows:
        key = row.get(SERIES_KEY)
        if not isinstance(key, str):
            continue
        series = out.setdefault(key, _new_series(row, numbers[key]))
        image = (key, row["source"], row["sha256"])
        if image in seen:  # per_frame: one row per frame of the same image
            continue
        seen.add(image)
        series["instances"] = int(series["instances"] or 0) + 1
        series["frames"] = int(series["frames"] or 0) + int(row.get("frames") or 1)
        instance = row.get("instance_number")
        if isinstance(instance, int):
            first, last = series["first_instance"], series["last_instance"]
            series["first_instance"] = (
                instance if not isinstance(first, int) else min(first, instance)
            )
            series["last_instance"] = instance if not isinstance(last, int) else max(last, instance)
    return sorted(out.values(), key=lambda r: int(r["series"] or 0))


def _new_series(row: Row, number: int) -> Row:
    return {
        "series": number,
        "series_number": row.get("series_number"),
        "modality": row.get("modality"),
        "instances": 0,
        "frames": 0,
        "first_instance": None,
        "last_instance": None,
        "series_description": row.get(DESCRIPTION_KEY),
    }


def write_series(rows: Sequence[Row], folder: Path) -> None:
    write_small_csv(folder / SERIES_NAME, rows, SERIES_COLUMNS, ints=_INT_COLUMNS, floats=())

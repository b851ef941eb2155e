"""An EMR batch's mergeable statistics as plain JSON, for the pipeline's rollup. Worker side.

Per group: `n`, `sources`, and per value column [count, sum, m2, min, max] (M2 for the
variance, merged exactly by the main process). Medians and quantiles cannot be merged
exactly, so they are never part of a rollup. The group label is kept with its published,
CSV-neutralised form, so the main process needs no table library to write the rollup.
"""

from __future__ import annotations

import math
from typing import Any

import pandas as pd

from daemon.processors import emr_stats
from daemon.processors.options import EmrOptions
from daemon.processors.tables import neutralise

MERGEABLE = ("mean", "std", "min", "max")


def rollup_partial(merged: pd.DataFrame, options: EmrOptions, columns: list[str]) -> dict[str, Any]:
    """`merged` (an emr_stats partial over the batch) as JSON; `columns` in published order."""
    present = set(emr_stats.value_columns(merged))
    groups: dict[str, Any] = {}
    for label, row in merged.iterrows():
        groups[str(label)] = {
            "label": neutralise(str(label)),
            "n": int(row[emr_stats.N]),
            "sources": int(row[emr_stats.SOURCES]),
            "columns": {c: _parts(row, c) for c in columns if c in present},
        }
    return {
        "spec": {
            "group_by": options.group_by,
            "statistics": [s for s in options.statistics if s in MERGEABLE],
            "missing": options.missing,
            "with_n": options.missing == "column" or "n" in options.statistics,
            "min_cell_size": options.min_cell_size,
            "min_cell_sources": options.min_cell_sources,
            "columns": list(columns),
        },
        "groups": groups,
    }


def _parts(row: pd.Series, column: str) -> list[float | int | None]:
    count = int(row[f"count:{column}"])
    values = [float(row[f"{p}:{column}"]) for p in ("sum", "m2", "min", "max")]
    return [count, *(None if math.isnan(v) else v for v in values)]

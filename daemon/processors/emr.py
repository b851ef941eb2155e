"""EMR tables (CSV, TSV, Parquet): per-group row counts and exact means of numeric columns.

Each file is reduced to per-group sums and counts with pyarrow; `merge` adds those up, so the
means are exact over the whole batch however it was split. Runs in worker processes.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv
import pyarrow.parquet as pq

from daemon.processors.base import Facts, ProcessorError
from daemon.processors.options import EmrOptions

N = "n"
_COUNT = "__count__"
FORMULA_PREFIXES = ("=", "+", "-", "@", "\t", "\r")


def neutralise(text: str) -> str:
    """OWASP CSV-injection rule: a text cell that a spreadsheet would run gets a leading quote."""
    return "'" + text if text.startswith(FORMULA_PREFIXES) else text


def _delimiter(path: Path) -> str:
    if path.suffix in (".tsv", ".tab"):
        return "\t"
    with path.open("rb") as fh:
        first = fh.readline(65536)
    return "\t" if first.count(b"\t") > first.count(b",") else ","


class EmrProcessor:
    kind: ClassVar[str] = "emr"
    Options: ClassVar[type[EmrOptions]] = EmrOptions

    def __init__(self, options: EmrOptions) -> None:
        self.options = options
        self._text_columns = {options.group_by, *options.id_columns}
        self._identifiers = {c.casefold() for c in options.id_columns}

    # -- read ------------------------------------------------------------------------------

    def _load(self, path: Path) -> pa.Table:
        if path.stat().st_size == 0:
            raise ProcessorError(path, "empty", "the file has no bytes")
        try:
            if path.suffix == ".parquet":
                return pq.read_table(path)
            return pacsv.read_csv(
                path,
                read_options=pacsv.ReadOptions(use_threads=False),
                parse_options=pacsv.ParseOptions(delimiter=_delimiter(path)),
                convert_options=pacsv.ConvertOptions(
                    column_types=dict.fromkeys(self._text_columns, pa.string()),
                    strings_can_be_null=True,
                ),
            )
        except (pa.ArrowInvalid, pa.ArrowNotImplementedError, OSError) as exc:
            # Arrow's messages can quote a row: keep only the kind of failure.
            raise ProcessorError(
                path, "bad_table", f"not a readable table ({type(exc).__name__})"
            ) from None

    def read(self, path: Path, name: str) -> tuple[pa.Table, Facts]:
        table = self._load(path)
        group = self.options.group_by
        if group not in table.column_names:
            raise ProcessorError(path, "missing_group_column", f"no column named {group!r}")
        rows = table.num_rows
        required = set(self.options.required_columns or table.column_names) | {group}
        missing = sorted(required - set(table.column_names))
        if missing:
            raise ProcessorError(path, "missing_column", f"{len(missing)} required column(s)")
        table = table.filter(self._complete_rows(table, required))
        numeric = [
            c
            for c in table.column_names
            if c not in self._text_columns
            and c.casefold() not in self._identifiers
            and _is_numeric(table.schema.field(c).type)
        ]
        aggregates: list[tuple[Any, str]] = [([], "count_all")]
        for c in numeric:
            aggregates += [(c, "sum"), (c, "count")]
        columns = {c: pc.cast(table[c], pa.float64()) for c in numeric}
        columns[group] = table[group]
        grouped = pa.table(columns).group_by(group, use_threads=False).aggregate(aggregates)
        partial = grouped.rename_columns([_rename(name, group) for name in grouped.column_names])
        facts: Facts = {
            "rows": rows,
            "rows_dropped": rows - table.num_rows,
            "groups": partial.num_rows,
        }
        return partial, facts

    @staticmethod
    def _complete_rows(table: pa.Table, required: set[str]) -> pa.ChunkedArray:
        mask = None
        for name in required:
            column = table[name]
            valid = pc.is_valid(column)
            if pa.types.is_floating(column.type):
                valid = pc.and_(valid, pc.invert(pc.is_nan(column)))
            mask = valid if mask is None else pc.and_(mask, valid)
        return mask

    # -- merge and write -------------------------------------------------------------------

    def merge(self, partials: Sequence[pa.Table]) -> pa.Table:
        group = self.options.group_by
        if not partials:
            return pa.table({group: pa.array([], pa.string()), N: pa.array([], pa.int64())})
        table = pa.concat_tables(partials, promote_options="default")
        adds = pc.ScalarAggregateOptions(skip_nulls=True, min_count=0)
        value_columns = [c for c in table.column_names if c != group]
        grouped = table.group_by(group, use_threads=False).aggregate(
            [(c, "sum", adds) for c in value_columns]
        )
        return grouped.rename_columns([c.removesuffix("_sum") for c in grouped.column_names])

    def write(self, merged: pa.Table, folder: Path) -> list[str]:
        group = self.options.group_by
        frame = pd.DataFrame(
            {
                group: [neutralise(g) for g in merged[group].to_pylist()],
                N: merged[N].to_numpy(zero_copy_only=False).astype("int64"),
            }
        )
        for name in merged.column_names:
            if name.startswith("sum:"):
                column = name.removeprefix("sum:")
                sums = merged[name].to_numpy(zero_copy_only=False)
                counts = merged[f"count:{column}"].to_numpy(zero_copy_only=False)
                means = np.full(len(sums), np.nan)
                np.divide(sums, counts, out=means, where=counts > 0)
                frame[f"mean_{column}"] = means
        frame = frame.sort_values(group, kind="stable").reset_index(drop=True)
        if self.options.output_format == "parquet":
            frame.to_parquet(folder / "result.parquet", index=False)
            return ["result.parquet"]
        frame.to_csv(folder / "result.csv", index=False)
        return ["result.csv"]


def _is_numeric(kind: pa.DataType) -> bool:
    return bool(
        pa.types.is_integer(kind) or pa.types.is_floating(kind) or pa.types.is_decimal(kind)
    )


def _rename(name: str, group: str) -> str:
    if name == "count_all":
        return N
    if name.endswith("_sum"):
        return "sum:" + name.removesuffix("_sum")
    if name.endswith("_count"):
        return "count:" + name.removesuffix("_count")
    return name

"""EMR tables (CSV, TSV, compressed text, Parquet, .xlsx): per-group counts and the chosen
statistics of the value columns, exact over the batch however it was split.

Each input is streamed (emr_sources.py) and checked as it is read (emr_scan.py), folded piece by
piece into mergeable partials (emr_fold.py, emr_stats.py); small files share one parse
(emr_batch.py). `write` publishes groups, never people: identifiers are never averaged nor
published, small cells are suppressed with their labels withheld. Runs in worker processes.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from daemon.processors import emr_rollup, emr_stats
from daemon.processors.base import Facts, ProcessorError
from daemon.processors.emr_batch import Outcome, read_batch
from daemon.processors.emr_fold import TableFold, needs_values
from daemon.processors.emr_sources import read_pieces
from daemon.processors.options import EmrOptions, is_person_identifier
from daemon.processors.tables import neutralise

N = emr_stats.N
SUPPRESSED = "suppressed"
OTHER = "other"


class EmrProcessor:
    kind: ClassVar[str] = "emr"
    Options: ClassVar[type[EmrOptions]] = EmrOptions

    def __init__(self, options: EmrOptions) -> None:
        self.options = options
        self.keep_values = needs_values(options)

    def is_identifier(self, column: str) -> bool:
        return is_person_identifier(column, self.options.id_columns)

    # -- read ------------------------------------------------------------------------------

    def read(self, path: Path, name: str) -> tuple[pd.DataFrame, Facts]:
        if path.stat().st_size == 0:
            raise ProcessorError(path, "empty", "the file has no bytes")
        fold = TableFold(self.options, path)
        for piece in read_pieces(path, self.options):
            fold.add(piece)
        return fold.finish()

    @classmethod
    def warm_up(cls, folder: Path) -> None:
        """A tiny export read, merged and written once in the pool's initializer: the first
        batch's one-time costs (~20 ms of the CSV reader's and pandas' first calls) are paid
        before the pool is ready, not by the first file dropped."""
        sample = folder / "sample.csv"
        sample.write_text("patient_id,diagnosis,age\n1,a,30\n2,b,\n", encoding="utf-8")
        processor = cls(cls.Options())
        partials, _ = processor.read_many([(sample, sample.name)])
        processor.write(processor.merge(partials), folder)

    def read_many(self, items: Sequence[tuple[Path, str]]) -> tuple[list[Any], list[Outcome]]:
        """The whole batch at once: small files share one parse (see emr_batch.py)."""
        return read_batch(self, items)

    # -- merge and write -------------------------------------------------------------------

    def merge(self, partials: Sequence[pd.DataFrame]) -> pd.DataFrame:
        return emr_stats.merge(partials, self.keep_values)

    def rollup_partial(self, merged: pd.DataFrame) -> dict[str, Any]:
        """The batch's mergeable statistics as JSON, for the pipeline's rollup."""
        return emr_rollup.rollup_partial(merged, self.options, self._columns(merged))

    def write(self, merged: pd.DataFrame, folder: Path) -> list[str]:
        cells = self._with_columns(self._sorted(merged))
        if self.options.small_cells == "merge":
            cells = self._merge_small(cells)
        suppressed = self._suppressed(cells)
        frame = self._frame(cells, suppressed)
        if self.options.output_format == "parquet":
            pq.write_table(
                pa.Table.from_pandas(frame, preserve_index=False), folder / "result.parquet"
            )
            return ["result.parquet"]
        (folder / "result.csv").write_text(_csv(frame), encoding="utf-8", newline="")
        return ["result.csv"]

    def _with_columns(self, cells: pd.DataFrame) -> pd.DataFrame:
        """Configured columns always appear (a stable schema), with no values where absent."""
        missing = [c for c in self.options.columns or () if f"count:{c}" not in cells.columns]
        if not missing:
            return cells
        extra = emr_stats.empty(self.keep_values, missing).reindex(cells.index)
        for c in missing:
            extra[f"count:{c}"] = 0
            extra[f"sum:{c}"] = extra[f"m2:{c}"] = 0.0
            if self.keep_values:
                extra[f"values:{c}"] = pd.Series([np.empty(0)] * len(cells), index=cells.index)
        return pd.concat([cells, extra.drop(columns=[N, emr_stats.SOURCES])], axis=1)

    def _columns(self, cells: pd.DataFrame) -> list[str]:
        if self.options.columns is not None:
            return [c for c in self.options.columns if c != self.options.group_by]
        return emr_stats.value_columns(cells)

    @staticmethod
    def _sorted(merged: pd.DataFrame) -> pd.DataFrame:
        order = sorted(range(len(merged)), key=lambda i: neutralise(str(merged.index[i])))
        return merged.iloc[order]

    def _frame(self, cells: pd.DataFrame, suppressed: np.ndarray) -> pd.DataFrame:
        """The published table: label, n, then each column's statistics, then `suppressed`;
        suppressed rows last, with their label and every number withheld."""
        options = self.options
        labels = [str(g) if g == OTHER else neutralise(str(g)) for g in cells.index]
        frame = pd.DataFrame({options.group_by: pd.array(labels, dtype=object)})
        frame.loc[suppressed & (frame[options.group_by] != OTHER).to_numpy(), options.group_by] = (
            None
        )
        frame[N] = pd.array(cells[N].to_numpy(np.int64), dtype="Int64")
        frame.loc[suppressed, N] = pd.NA
        statistics = [s for s in options.statistics if s != "n"]
        with_n = options.missing == "column" or "n" in options.statistics
        for column in self._columns(cells):
            count = cells[f"count:{column}"].to_numpy(np.int64)
            hidden = suppressed | (count < options.min_cell_size)
            if with_n:
                frame[f"n_{column}"] = pd.array(count, dtype="Int64")
                frame.loc[suppressed, f"n_{column}"] = pd.NA
            for name in statistics:
                values = emr_stats.statistic(cells, column, name)
                frame[f"{name}_{column}"] = np.where(hidden, np.nan, values)
        frame[SUPPRESSED] = suppressed
        order = np.argsort(suppressed, kind="stable")
        return frame.iloc[order].reset_index(drop=True)

    def _suppressed(self, cells: pd.DataFrame) -> np.ndarray:
        """Small cells: fewer than min_cell_size rows, or rows from fewer than
        min_cell_sources inputs (ten zero rows padding a victim's group from one file do not
        open it). A single small cell could be recovered by subtraction from the batch total:
        the smallest other cell is then suppressed with it."""
        n = cells[N].to_numpy(np.int64)
        suppressed = self._small(cells)
        if suppressed.sum() == 1 and (~suppressed).any():
            kept = np.flatnonzero(~suppressed)
            suppressed[kept[np.argmin(n[kept])]] = True
        return suppressed

    def _merge_small(self, cells: pd.DataFrame) -> pd.DataFrame:
        """Small cells folded into one `other` row, with the smallest others until that row is
        no small cell itself (its statistics merged exactly from the partials)."""
        small = self._small(cells)
        if not small.any():
            return cells
        n = cells[N].to_numpy(np.int64)
        fold = small | (cells.index == OTHER)
        while n[fold].sum() < self.options.min_cell_size and not fold.all():
            rest = np.flatnonzero(~fold)
            fold[rest[np.argmin(n[rest])]] = True
        other = cells[fold].set_axis([OTHER] * int(fold.sum()))
        merged = emr_stats.merge(
            [other.iloc[i : i + 1] for i in range(len(other))], self.keep_values
        )
        return pd.concat([cells[~fold], merged])

    def _small(self, cells: pd.DataFrame) -> np.ndarray:
        n = cells[N].to_numpy(np.int64)
        sources = cells[emr_stats.SOURCES].to_numpy(np.int64)
        return np.asarray(
            (n < self.options.min_cell_size) | (sources < self.options.min_cell_sources), bool
        )


def _csv(frame: pd.DataFrame) -> str:
    """Text quoted, numbers bare, `suppressed` as true/false, missing values empty: a CR
    inside a label stays inside its quotes and cannot start a new row."""
    lines = [",".join(_quote(str(c)) for c in frame.columns)]
    for row in frame.itertuples(index=False):
        lines.append(",".join(_cell(v) for v in row))
    return "\n".join(lines) + "\n"


def _cell(value: object) -> str:
    if value is None or value is pd.NA or (isinstance(value, float) and np.isnan(value)):
        return '""'
    if isinstance(value, bool | np.bool_):
        return "true" if value else "false"
    if isinstance(value, str):
        return _quote(value)
    if isinstance(value, float | np.floating):
        return repr(float(value))
    return str(int(value))  # type: ignore[call-overload]


def _quote(text: str) -> str:
    return '"' + text.replace('"', '""') + '"'

"""EMR tables (CSV, TSV, Parquet): per-group row counts and exact means of numeric columns.

Each file is first checked cheaply (text, UTF-8, line length, header width, line count, quotes)
and refused before parsing if it is hostile; then reduced to per-group sums and counts with
pyarrow; `merge` adds those up, so the means are exact over the whole batch however it was split.
`write` publishes groups, never people: identifiers are never averaged nor published, and small
cells are suppressed. Runs in worker processes.
"""

from __future__ import annotations

import codecs
import csv
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv
import pyarrow.parquet as pq

from daemon.processors.base import Facts, ProcessorError
from daemon.processors.emr_batch import Outcome, is_numeric, read_batch
from daemon.processors.options import EmrOptions, identifier_key

N = "n"
SUPPRESSED = "suppressed"
OTHER = "other"
FORMULA_PREFIXES = ("=", "+", "-", "@", "\t", "\r")
_CHUNK_BYTES = 1 << 20
_NEWLINE = 10


def neutralise(text: str) -> str:
    """OWASP CSV-injection rule: a text cell that a spreadsheet would run gets a leading quote."""
    return "'" + text if text.startswith(FORMULA_PREFIXES) else text


@dataclass(frozen=True, slots=True)
class Header:
    delimiter: str
    names: list[str]


class _TextScan:
    """One bounded pass over a CSV's bytes, refusing it before any parser sees it: no NUL
    (binary), valid UTF-8, no line longer than `max_row_bytes`, a header no wider than
    `max_columns`, no more than `max_rows` lines after it, an even number of quote characters
    (an odd one is a quote that never ends and would swallow the rest of the file), and, where
    there are quotes, strict quoting."""

    def __init__(self, path: Path, options: EmrOptions) -> None:
        self.path = path
        self.options = options
        self.decoder = codecs.getincrementaldecoder("utf-8")("strict")
        self.head = b""
        self.header: Header | None = None
        self.newlines = 0
        self.quotes = 0
        self.offset = 0
        self.last_newline = -1

    def run(self) -> Header:
        with self.path.open("rb") as fh:
            while chunk := fh.read(_CHUNK_BYTES):
                self._feed(chunk)
        try:
            self.decoder.decode(b"", final=True)
        except UnicodeDecodeError:
            self._refuse("not_utf8", "the text ends inside a UTF-8 sequence")
        if self.header is None:
            self._read_header(self.head)
        if self.quotes % 2:
            self._refuse("unterminated_quote", "a quoted field is never closed")
        assert self.header is not None
        if self.quotes:
            self._check_quoting(self.header.delimiter)
        return self.header

    def _check_quoting(self, delimiter: str) -> None:
        """RFC 4180 quoting, strictly (Python's csv at ~100 MB/s, only for files with quotes):
        pyarrow is lenient, and two stray quotes make one cell of every line between them."""
        csv.field_size_limit(self.options.max_row_bytes)
        try:
            with self.path.open(encoding="utf-8-sig", newline="") as fh:
                for _ in csv.reader(fh, delimiter=delimiter, strict=True):
                    pass
        except csv.Error as exc:
            if "field limit" in str(exc):
                limit = self.options.max_row_bytes
                self._refuse("row_too_large", f"a field is longer than max_row_bytes ({limit})")
            self._refuse("bad_quoting", "a quote that does not open or close a field")

    def _refuse(self, reason: str, detail: str) -> None:
        raise ProcessorError(self.path, reason, detail)

    def _feed(self, chunk: bytes) -> None:
        if b"\x00" in chunk:
            self._refuse("not_text", "NUL bytes: binary content, not a text table")
        pending = self.decoder.getstate()[0]
        if pending or not chunk.isascii():
            try:
                self.decoder.decode(chunk)
            except UnicodeDecodeError:
                self._refuse("not_utf8", "not UTF-8 text (mixed or other encodings)")
        self.quotes += chunk.count(b'"')
        positions = np.flatnonzero(np.frombuffer(chunk, np.uint8) == _NEWLINE) + self.offset
        ends = np.concatenate(([self.last_newline], positions, [self.offset + len(chunk)]))
        if int(np.diff(ends).max()) - 1 > self.options.max_row_bytes:
            limit = self.options.max_row_bytes
            self._refuse("row_too_large", f"a line is longer than max_row_bytes ({limit})")
        if self.header is None:
            self.head += chunk if not positions.size else chunk[: positions[0] - self.offset]
            if positions.size:
                self._read_header(self.head)
        self.newlines += positions.size
        if positions.size:
            self.last_newline = int(positions[-1])
        self.offset += len(chunk)
        # Lines after the header; a last line without its newline counts too.
        if self.newlines - 1 > self.options.max_rows:
            limit = self.options.max_rows
            self._refuse("too_many_rows", f"more than max_rows ({limit}) lines")

    def _read_header(self, raw: bytes) -> None:
        text = raw.decode("utf-8-sig").rstrip("\r")
        if not text.strip():
            self._refuse("empty", "no header line")
        delimiter = _delimiter(self.path, text)
        # A comma count first: the header is refused before any list of 100,000 names is built.
        width = text.count(delimiter) + 1
        if width > self.options.max_columns:
            limit = self.options.max_columns
            self._refuse("too_many_columns", f"{width} columns, max_columns is {limit}")
        names = next(csv.reader([text], delimiter=delimiter))
        if len(set(names)) != len(names) or not all(names):
            self._refuse("bad_header", "empty or duplicate column names")
        self.header = Header(delimiter, names)


def _delimiter(path: Path, header: str) -> str:
    if path.suffix in (".tsv", ".tab"):
        return "\t"
    return "\t" if header.count("\t") > header.count(",") else ","


class EmrProcessor:
    kind: ClassVar[str] = "emr"
    Options: ClassVar[type[EmrOptions]] = EmrOptions

    def __init__(self, options: EmrOptions) -> None:
        self.options = options
        self._identifier_keys = {identifier_key(c) for c in options.id_columns}

    def is_identifier(self, column: str) -> bool:
        return identifier_key(column) in self._identifier_keys

    # -- read ------------------------------------------------------------------------------

    def _load(self, path: Path) -> pa.Table:
        if path.stat().st_size == 0:
            raise ProcessorError(path, "empty", "the file has no bytes")
        if path.suffix == ".parquet":
            return self._load_parquet(path)
        header = _TextScan(path, self.options).run()
        text_columns = [
            c for c in header.names if c == self.options.group_by or self.is_identifier(c)
        ]
        try:
            return pacsv.read_csv(
                path,
                read_options=pacsv.ReadOptions(
                    use_threads=False, block_size=2 * self.options.max_row_bytes
                ),
                parse_options=pacsv.ParseOptions(delimiter=header.delimiter),
                convert_options=pacsv.ConvertOptions(
                    column_types=dict.fromkeys(text_columns, pa.string()),
                    strings_can_be_null=True,
                ),
            )
        except (pa.ArrowInvalid, pa.ArrowNotImplementedError, OSError) as exc:
            # Arrow's messages can quote a row: keep only the kind of failure.
            if "straddl" in str(exc):
                raise ProcessorError(
                    path, "row_too_large", "a quoted field spans more than max_row_bytes"
                ) from None
            raise ProcessorError(
                path, "bad_table", f"not a readable table ({type(exc).__name__})"
            ) from None

    def _load_parquet(self, path: Path) -> pa.Table:
        """The footer's counts are checked before any column is read."""
        try:
            meta = pq.ParquetFile(path).metadata
            if meta.num_columns > self.options.max_columns:
                raise ProcessorError(
                    path,
                    "too_many_columns",
                    f"{meta.num_columns} columns, max_columns is {self.options.max_columns}",
                )
            if meta.num_rows > self.options.max_rows:
                raise ProcessorError(
                    path,
                    "too_many_rows",
                    f"{meta.num_rows} rows, max_rows is {self.options.max_rows}",
                )
            return pq.read_table(path)
        except (pa.ArrowInvalid, pa.ArrowNotImplementedError, OSError) as exc:
            raise ProcessorError(
                path, "bad_table", f"not a readable table ({type(exc).__name__})"
            ) from None

    def read(self, path: Path, name: str) -> tuple[pa.Table, Facts]:
        table = self._load(path)
        group = self.options.group_by
        if group not in table.column_names:
            raise ProcessorError(path, "missing_group_column", f"no column named {group!r}")
        rows = table.num_rows
        if rows > self.options.max_rows:  # lines were counted; quoted newlines can hide rows
            raise ProcessorError(path, "too_many_rows", f"more than max_rows ({rows})")
        required = set(self.options.required_columns or table.column_names) | {group}
        missing = sorted(required - set(table.column_names))
        if missing:
            raise ProcessorError(path, "missing_column", f"{len(missing)} required column(s)")
        table = table.filter(self.complete_rows(table, required))
        numeric = [
            c
            for c in table.column_names
            if c != group and not self.is_identifier(c) and is_numeric(table.schema.field(c).type)
        ]
        partial = self.reduce(table, numeric)
        facts: Facts = {
            "rows": rows,
            "rows_dropped": rows - table.num_rows,
            "groups": partial.num_rows,
        }
        return partial, facts

    def read_many(self, items: Sequence[tuple[Path, str]]) -> tuple[list[Any], list[Outcome]]:
        """The whole batch at once: small files share one parse (see emr_batch.py)."""
        return read_batch(self, items)

    def reduce(self, table: pa.Table, numeric: Sequence[str]) -> pa.Table:
        """Complete rows → per-group row count and each numeric column's sum and count."""
        group = self.options.group_by
        aggregates: list[tuple[Any, str]] = [([], "count_all")]
        for c in numeric:
            aggregates += [(c, "sum"), (c, "count")]
        columns = {c: pc.cast(table[c], pa.float64()) for c in numeric}
        columns[group] = pc.cast(table[group], pa.string())
        grouped = pa.table(columns).group_by(group, use_threads=False).aggregate(aggregates)
        return grouped.rename_columns([_rename(name, group) for name in grouped.column_names])

    @staticmethod
    def complete_rows(table: pa.Table, required: set[str]) -> pa.ChunkedArray:
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
        cells = self._suppress(self._cells(merged))
        group = self.options.group_by
        frame = pd.DataFrame({group: [neutralise(g) for g in cells[group]]})
        suppressed = cells[SUPPRESSED].to_numpy(bool)
        n = cells[N].astype("int64")
        frame[N] = n.astype("Int64").mask(suppressed) if suppressed.any() else n
        for name in cells.columns:
            if name.startswith("sum:"):
                column = name.removeprefix("sum:")
                sums = cells[name].to_numpy(np.float64)
                counts = cells[f"count:{column}"].to_numpy(np.float64)
                means = np.full(len(sums), np.nan)
                # A mean over fewer values than a cell may hold is a small cell too.
                usable = (counts >= self.options.min_cell_size) & (counts > 0) & ~suppressed
                np.divide(sums, counts, out=means, where=usable)
                frame[f"mean_{column}"] = means
        if suppressed.any():
            frame[SUPPRESSED] = suppressed
        if self.options.output_format == "parquet":
            frame.to_parquet(folder / "result.parquet", index=False)
            return ["result.parquet"]
        # Text quoted, numbers not (as genomics): a CR inside a label must not start a new row.
        frame.to_csv(
            folder / "result.csv", index=False, quoting=csv.QUOTE_NONNUMERIC, lineterminator="\n"
        )
        return ["result.csv"]

    def _cells(self, merged: pa.Table) -> pd.DataFrame:
        """One row per group (sorted as published): label, n, and each sum and count."""
        group = self.options.group_by
        cells = pd.DataFrame(
            {
                name: merged[name].to_numpy(zero_copy_only=False)
                for name in merged.column_names
                if name != group
            }
        )
        cells.insert(0, group, merged[group].to_pylist())
        cells[N] = cells[N].astype("int64")
        order = sorted(range(len(cells)), key=lambda i: neutralise(str(cells[group].iat[i])))
        return cells.iloc[order].reset_index(drop=True)

    def _suppress(self, cells: pd.DataFrame) -> pd.DataFrame:
        """Mark the small cells (`n` < min_cell_size) as suppressed: blanked as they are
        ("blank"), or folded into one `other` row ("merge") together with the smallest other
        groups until that row is no small cell itself.

        Every input's row count is in the manifest, so a single blanked cell could be recovered
        by subtraction: the smallest other cell is then blanked with it.
        """
        minimum = self.options.min_cell_size
        if self.options.small_cells == "merge":
            cells = self._merge_small(cells)
        n = cells[N].to_numpy()
        suppressed = n < minimum
        if suppressed.sum() == 1 and (~suppressed).any():
            kept = np.flatnonzero(~suppressed)
            suppressed[kept[np.argmin(n[kept])]] = True
        return cells.assign(**{SUPPRESSED: suppressed})

    def _merge_small(self, cells: pd.DataFrame) -> pd.DataFrame:
        minimum = self.options.min_cell_size
        group = self.options.group_by
        n = cells[N].to_numpy()
        if not (n < minimum).any():
            return cells
        fold = (n < minimum) | (cells[group] == OTHER).to_numpy(bool)
        while n[fold].sum() < minimum and not fold.all():
            rest = np.flatnonzero(~fold)
            fold[rest[np.argmin(n[rest])]] = True
        other = cells[fold].drop(columns=[group]).sum().to_frame().T
        other.insert(0, group, OTHER)
        other[N] = other[N].astype("int64")
        return pd.concat([cells[~fold], other], ignore_index=True)


def _rename(name: str, group: str) -> str:
    if name == "count_all":
        return N
    if name.endswith("_sum"):
        return "sum:" + name.removesuffix("_sum")
    if name.endswith("_count"):
        return "count:" + name.removesuffix("_count")
    return name

"""Gene-expression tables (CSV, TSV; long or wide): per-gene count, exact mean and sample std.

Each file is reduced to per-gene count, mean and M2 (sum of squared deviations) and the distinct
(gene, sample) pairs; `merge` combines those with Chan et al.'s parallel update, so the statistics
are exact over the whole batch however it was split. Runs in worker processes.
"""

from __future__ import annotations

import csv
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, NamedTuple

import numpy as np
import numpy.typing as npt
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv

from daemon.processors.base import Facts, ProcessorError
from daemon.processors.options import GenomicsOptions

RESULT_NAME = "result.csv"
RESULT_HEADER = ("gene", "n", "mean", "std", "samples")
HEADER_MAX_BYTES = 16 << 20  # a wide header: one name per sample
STATS_COLUMNS = ("gene", "n", "mean", "m2")
# Cells that pandas' `to_numeric` (the reference parser, see `_floats`) does not take for numbers
# either: read as missing, so that a file using them keeps the fast path.
NOT_NUMBERS = ("-", ".", "?", "None", "none", "<NA>", "#VALUE!", "#DIV/0!", "#NUM!", "#NAME?")

Codes = npt.NDArray[np.int64]
Floats = npt.NDArray[np.float64]
Flags = npt.NDArray[np.bool_]


def _no_codes() -> Codes:
    return np.zeros(0, dtype=np.int64)


def _no_floats() -> Floats:
    return np.zeros(0, dtype=np.float64)


def _no_genes() -> pa.Array:
    return pa.nulls(0, type=pa.string())


@dataclass(frozen=True, eq=False)
class GeneStats:
    """Per gene `n`, `mean` and `m2`, one row a gene, sorted by gene ID (`stats["mean"]`)."""

    gene: pa.Array = field(default_factory=_no_genes)
    n: Codes = field(default_factory=_no_codes)
    mean: Floats = field(default_factory=_no_floats)
    m2: Floats = field(default_factory=_no_floats)

    def __len__(self) -> int:
        return len(self.n)

    def __getitem__(self, column: str) -> Any:
        if column not in STATS_COLUMNS:
            raise KeyError(column)
        return getattr(self, column)

    def equals(self, other: GeneStats) -> bool:
        """The same genes and the same numbers, to the bit."""
        return bool(self.gene.equals(other.gene)) and all(
            np.array_equal(self[c], other[c], equal_nan=True) for c in STATS_COLUMNS[1:]
        )


@dataclass(frozen=True, eq=False)
class GenomicsPartial:
    """Per-gene statistics, and the distinct (gene, sample) pairs, sorted, each as
    `row in stats * len(samples) + index in samples` (`samples` sorted)."""

    stats: GeneStats = field(default_factory=GeneStats)
    samples: tuple[str, ...] = ()
    pairs: Codes = field(default_factory=_no_codes)


class Cells(NamedTuple):
    """One table's sorted gene IDs and sample names, how many values it has, and the usable
    values, with the gene, sample and row each one comes from."""

    gene_ids: pa.Array
    sample_ids: tuple[str, ...]
    n_values: int
    values: Floats
    genes: Codes  # index into gene_ids
    samples: Codes  # index into sample_ids
    rows: Codes


def _header(path: Path) -> tuple[str, list[str]]:
    """The delimiter (tab if the first line has one, else comma) and the column names."""
    with path.open("rb") as fh:
        first = fh.readline(HEADER_MAX_BYTES)
    if not first.strip():
        raise ProcessorError(path, "empty", "no header line")
    if b"\x00" in first:
        raise ProcessorError(path, "bad_table", "binary content, not a text table")
    try:
        line = first.decode("utf-8-sig")
    except UnicodeDecodeError:
        raise ProcessorError(path, "bad_table", "the header is not UTF-8 text") from None
    delimiter = "\t" if "\t" in line else ","
    names = next(csv.reader([line.rstrip("\r\n")], delimiter=delimiter))
    if len(set(names)) != len(names):
        raise ProcessorError(path, "bad_table", "duplicate column names")
    return delimiter, names


def _read(path: Path, delimiter: str, names: list[str], types: dict[str, Any]) -> pa.Table:
    nulls = [*pacsv.ConvertOptions().null_values, *NOT_NUMBERS]
    table: pa.Table = pacsv.read_csv(
        path,
        # The pool already runs one batch per CPU: no extra reader threads.
        read_options=pacsv.ReadOptions(column_names=names, skip_rows=1, use_threads=False),
        parse_options=pacsv.ParseOptions(delimiter=delimiter),
        # Text columns never become null: "NA" or "null" can be a gene ID.
        convert_options=pacsv.ConvertOptions(
            column_types=types, null_values=nulls, strings_can_be_null=False
        ),
    )
    return table


def _load(path: Path, delimiter: str, names: list[str], numeric: set[str]) -> pa.Table:
    """ID columns as text, so gene IDs stay byte-exact (`SEPT2`, `1-Mar`, `000123` are no dates or
    numbers); `numeric` columns as float64 when Arrow parses every cell of them (a missing cell is
    null). Else every column as text, and `_floats` drops a bad value rather than fail the file."""
    text = dict.fromkeys(names, pa.string())
    try:
        return _read(path, delimiter, names, text | dict.fromkeys(numeric, pa.float64()))
    except pa.ArrowInvalid:
        pass  # a value that is no number, or no table at all: the text read tells which
    try:
        return _read(path, delimiter, names, text)
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError, OSError) as exc:
        # Arrow's messages can quote a row: keep only the kind of failure.
        raise ProcessorError(
            path, "bad_table", f"not a readable table ({type(exc).__name__})"
        ) from None


def _floats(column: pa.ChunkedArray) -> Floats:
    """Expression values; missing or non-numeric ones are NaN (dropped later, like infinities).

    A float column is Arrow's parse: the same double as pandas' for every number (checked on
    hostile and random text; only an integer "-0" differs, in a sign no sum keeps). A text column
    (its file had a cell Arrow could not parse) goes through pandas' more lenient `to_numeric`,
    the reference for what counts as a number."""
    if pa.types.is_floating(column.type):
        array = column.combine_chunks()
        values: Floats = _view(array, np.float64).copy()
        if array.null_count:
            bits = np.frombuffer(array.buffers()[0], dtype=np.uint8)
            valid = np.unpackbits(bits, count=array.offset + len(array), bitorder="little")
            values[valid[array.offset :] == 0] = np.nan
        return values
    # Imported here: most files never need it, and it adds ~0.3 s to a worker's first batch.
    import pandas as pd

    parsed = pd.to_numeric(column.to_pandas(), errors="coerce").astype("float64")
    return np.asarray(parsed, dtype=np.float64)


# Arrow to NumPy and back through buffers: `pa.array`, `pa.scalar`, `to_numpy` and `np.asarray`
# all import pandas on first use, which would cost every fresh worker ~0.3 s of CPU.


def _view(array: pa.Array, dtype: type[Any]) -> npt.NDArray[Any]:
    """The values of a fixed-width Arrow array (under a null: whatever is there), read-only."""
    offset = array.offset * np.dtype(dtype).itemsize
    return np.frombuffer(array.buffers()[1], dtype=dtype, count=len(array), offset=offset)


def _arrow_codes(codes: Codes) -> pa.Array:
    data = pa.py_buffer(np.ascontiguousarray(codes, dtype=np.int64))
    return pa.Array.from_buffers(pa.int64(), len(codes), [None, data])


def _codes(column: pa.ChunkedArray) -> tuple[pa.Array, Codes, Flags]:
    """The distinct values of a text column, sorted; each cell's index among them; which of
    them are not "" (a cell without an ID)."""
    encoded = column.combine_chunks().dictionary_encode()  # int32 indices, no nulls
    order = pc.array_sort_indices(encoded.dictionary)
    rank = np.empty(len(order), dtype=np.int64)
    rank[_view(order, np.uint64)] = np.arange(len(order))
    ids = encoded.dictionary.take(order)
    named = np.ones(len(ids), dtype=np.bool_)
    named[:1] = ids[:1].to_pylist() != [""]  # "" sorts first
    return ids, rank[_view(encoded.indices, np.int32)], named


def _long_cells(table: pa.Table, gene: str, sample: str, expression: str) -> Cells:
    gene_ids, genes, named_genes = _codes(table[gene])
    sample_ids, samples, named_samples = _codes(table[sample])
    values = _floats(table[expression])
    usable = np.isfinite(values) & named_genes[genes] & named_samples[samples]
    rows = np.flatnonzero(usable)
    return Cells(
        gene_ids,
        tuple(sample_ids.to_pylist()),
        len(values),
        values[rows],
        genes[rows],
        samples[rows],
        rows,
    )


def _wide_cells(table: pa.Table, gene: str) -> Cells:
    gene_ids, genes, named_genes = _codes(table[gene])
    names = [c for c in table.column_names if c != gene]
    sample_ids = tuple(sorted(names))  # code point order, as Arrow sorts the gene IDs
    rank = {name: i for i, name in enumerate(sample_ids)}
    samples = np.array([rank[name] for name in names], dtype=np.int64)
    matrix = np.empty((len(names), table.num_rows), dtype=np.float64)
    for i, name in enumerate(names):
        matrix[i] = _floats(table[name])
    named = np.array([name != "" for name in names], dtype=np.bool_)
    usable = np.isfinite(matrix) & named[:, None] & named_genes[genes][None, :]
    columns, rows = np.nonzero(usable)
    return Cells(
        gene_ids, sample_ids, matrix.size, matrix[usable], genes[rows], samples[columns], rows
    )


def _reduce(cells: Cells) -> GenomicsPartial:
    """Per-gene mean, refined by the mean deviation from it (about as exact as a compensated
    sum), and M2 as the sum of squared deviations from it, never as a difference of sums."""
    genes, values = cells.genes, cells.values
    size = len(cells.gene_ids)
    n = np.bincount(genes, minlength=size).astype(np.int64)
    per = np.maximum(n, 1)
    mean = _sums(genes, values, size) / per
    mean += _sums(genes, values - mean[genes], size) / per
    m2 = _sums(genes, (values - mean[genes]) ** 2, size)
    has = n > 0
    row = np.cumsum(has) - 1  # a gene's row among the genes that have a value
    width = len(cells.sample_ids)
    pairs = _sorted_unique(row[genes] * width + cells.samples, int(has.sum()) * width)
    genes_kept = cells.gene_ids.take(_arrow_codes(np.flatnonzero(has)))
    stats = GeneStats(genes_kept, n[has], mean[has], m2[has])
    return GenomicsPartial(stats, cells.sample_ids, pairs)


def _sums(groups: Codes, weights: Floats, size: int) -> Floats:
    """Per group the sum of its weights, added in the order given."""
    return np.bincount(groups, weights=weights, minlength=size).astype(np.float64, copy=False)


class GenomicsProcessor:
    kind: ClassVar[str] = "genomics"
    Options: ClassVar[type[GenomicsOptions]] = GenomicsOptions

    def __init__(self, options: GenomicsOptions) -> None:
        self.options = options

    def _layout(self, path: Path, names: list[str]) -> str:
        options = self.options
        gene = options.gene_column
        if gene not in names:
            raise ProcessorError(path, "missing_gene_column", f"no column named {gene!r}")
        is_long = {options.sample_column, options.expression_column} <= set(names)
        if options.layout == "long" or (options.layout == "auto" and is_long):
            if not is_long:
                raise ProcessorError(
                    path,
                    "missing_gene_column",
                    f"long layout needs {options.sample_column!r} and "
                    f"{options.expression_column!r} columns",
                )
            return "long"
        if len(names) < 2:
            raise ProcessorError(path, "missing_gene_column", "wide layout needs sample columns")
        return "wide"

    def _numeric(self, names: list[str], layout: str) -> set[str]:
        """The value columns, but never an ID column (even one also named the value column)."""
        options = self.options
        if layout == "wide":
            return set(names) - {options.gene_column}
        return {options.expression_column} - {options.gene_column, options.sample_column}

    def read(self, path: Path, name: str) -> tuple[GenomicsPartial, Facts]:
        if path.stat().st_size == 0:
            raise ProcessorError(path, "empty", "the file has no bytes")
        delimiter, names = _header(path)
        layout = self._layout(path, names)
        table = _load(path, delimiter, names, self._numeric(names, layout))
        if table.num_rows == 0:
            raise ProcessorError(path, "empty", "no data rows")
        options = self.options
        if layout == "long":
            cells = _long_cells(
                table, options.gene_column, options.sample_column, options.expression_column
            )
        else:
            cells = _wide_cells(table, options.gene_column)
        partial = _reduce(cells)
        facts: Facts = {
            "rows": table.num_rows,
            # A row is dropped when none of its values could be used.
            "rows_dropped": table.num_rows - len(_sorted_unique(cells.rows, table.num_rows)),
            "values_dropped": cells.n_values - len(cells.values),
            "genes": len(partial.stats),
            "samples": len(_sorted_unique(cells.samples, len(cells.sample_ids))),
        }
        return partial, facts

    def merge(self, partials: Sequence[GenomicsPartial]) -> GenomicsPartial:
        """Chan et al. for k groups: N = sum n, mean = sum(n mean) / N,
        M2 = sum M2 + sum n (mean_i - mean)^2. Rows are put in a canonical order first, so the
        order of the partials does not change a bit of the result."""
        parts = [p for p in partials if len(p.stats)]
        if not parts:
            # Only files without a usable value (and so without pairs either).
            return GenomicsPartial()
        gene_ids, genes, _ = _codes(pa.chunked_array([p.stats.gene for p in parts]))
        n_in = np.concatenate([p.stats.n for p in parts]).astype(np.float64)
        mean_in = np.concatenate([p.stats.mean for p in parts])
        m2_in = np.concatenate([p.stats.m2 for p in parts])
        order = np.lexsort((m2_in, mean_in, n_in, genes))
        by, n_by, mean_by = genes[order], n_in[order], mean_in[order]
        size = len(gene_ids)
        n = _sums(by, n_by, size)
        mean = _sums(by, n_by * mean_by, size) / n
        m2 = _sums(by, m2_in[order], size) + _sums(by, n_by * (mean_by - mean[by]) ** 2, size)
        samples, pairs = _merge_pairs(parts, genes, len(gene_ids))
        stats = GeneStats(gene_ids, n.astype(np.int64), mean, m2)
        return GenomicsPartial(stats, samples, pairs)

    def write(self, merged: GenomicsPartial, folder: Path) -> list[str]:
        stats = merged.stats
        samples = np.bincount(merged.pairs // max(len(merged.samples), 1), minlength=len(stats))
        columns = (stats.gene.to_pylist(), stats.n.tolist(), stats.mean.tolist())
        rows = zip(*columns, _std_cells(stats.m2, stats.n), samples.tolist(), strict=True)
        # Gene IDs are written byte-exact and quoted, never neutralised with a leading quote as
        # other processors' text cells are: they are join keys for the next tool, and a changed
        # ID is a wrong ID. So a hostile "=..." gene arrives as it was; open this file in a
        # spreadsheet only with the gene column imported as text.
        with (folder / RESULT_NAME).open("w", encoding="utf-8", newline="") as fh:
            writer = csv.writer(fh, quoting=csv.QUOTE_NONNUMERIC, lineterminator="\n")
            writer.writerow(RESULT_HEADER)
            writer.writerows(rows)
        return [RESULT_NAME]


def _std_cells(m2: Floats, n: Codes) -> list[float | str]:
    """Sample std (ddof=1); undefined, so empty, for a single value."""
    with np.errstate(divide="ignore", invalid="ignore"):
        std: list[float] = ((m2 / (n - 1)) ** 0.5).tolist()
    return [s if k >= 2 else "" for s, k in zip(std, n.tolist(), strict=True)]


def _merge_pairs(
    parts: list[GenomicsPartial], genes: Codes, n_genes: int
) -> tuple[tuple[str, ...], Codes]:
    """The union of the parts' (gene, sample) pairs over the union of their sample names;
    `genes` holds the merged row of each part's stats rows, part after part."""
    names = sorted(set().union(*(p.samples for p in parts)))
    index = {name: i for i, name in enumerate(names)}
    chunks, start = [], 0
    for part in parts:
        rows = genes[start : start + len(part.stats)]
        start += len(part.stats)
        width = len(part.samples)  # not 0: a part with genes has samples
        sample_map = np.array([index[s] for s in part.samples], dtype=np.int64)
        chunks.append(rows[part.pairs // width] * len(names) + sample_map[part.pairs % width])
    return tuple(names), _sorted_unique(np.concatenate(chunks), n_genes * len(names))


def _sorted_unique(codes: Codes, size: int) -> Codes:
    """`np.unique(codes)` for codes in range(size), in time linear in the larger of the two:
    marks in a bitmap when that is small, else a stable sort (a merge of the sorted runs that
    concatenated partials are) and a mask. NumPy's own hashes, then sorts: 30x slower here."""
    if size <= 8 * len(codes) + 4096:
        seen = np.zeros(size, dtype=np.bool_)
        seen[codes] = True
        return np.flatnonzero(seen).astype(np.int64)
    ordered = np.sort(codes, kind="stable")
    first = np.ones(len(ordered), dtype=np.bool_)
    np.not_equal(ordered[1:], ordered[:-1], out=first[1:])
    return ordered[first]

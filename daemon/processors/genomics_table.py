"""Gene-expression tables parsed into cells: Arrow reads the checked text, IDs as exact text and
values as float64; each usable value with its gene, sample and row. Runs in worker processes.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import numpy as np
import numpy.typing as npt
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv

from daemon.processors.base import ProcessorError
from daemon.processors.genomics_input import TableInput

# Cells that pandas' `to_numeric` (the reference parser, see `_floats`) does not take for numbers
# either: read as missing, so that a file using them keeps the fast path.
NOT_NUMBERS = ("-", ".", "?", "None", "none", "<NA>", "#VALUE!", "#DIV/0!", "#NUM!", "#NAME?")

Codes = npt.NDArray[np.int64]
Floats = npt.NDArray[np.float64]
Flags = npt.NDArray[np.bool_]


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


def _read(source: TableInput, types: dict[str, Any]) -> pa.Table:
    nulls = [*pacsv.ConvertOptions().null_values, *NOT_NUMBERS]
    names, delimiter = source.names, source.delimiter
    with source.open() as stream:
        table: pa.Table = pacsv.read_csv(
            stream,
            # The pool already runs one batch per CPU: no extra reader threads.
            read_options=pacsv.ReadOptions(column_names=names, skip_rows=1, use_threads=False),
            parse_options=pacsv.ParseOptions(delimiter=delimiter),
            # Text columns never become null: "NA" or "null" can be a gene ID.
            convert_options=pacsv.ConvertOptions(
                column_types=types, null_values=nulls, strings_can_be_null=False
            ),
        )
    return table


def load_table(source: TableInput, numeric: set[str]) -> pa.Table:
    """ID columns as text, so gene IDs stay byte-exact (`SEPT2`, `1-Mar`, `000123` are no dates or
    numbers); `numeric` columns as float64 when Arrow parses every cell of them (a missing cell is
    null). Else every column as text, and `_floats` drops a bad value rather than fail the file."""
    text = dict.fromkeys(source.names, pa.string())
    try:
        return _read(source, text | dict.fromkeys(numeric, pa.float64()))
    except pa.ArrowInvalid:
        pass  # a value that is no number, or no table at all: the text read tells which
    try:
        return _read(source, text)
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError, OSError) as exc:
        # Arrow's messages can quote a row: keep only the kind of failure.
        raise ProcessorError(
            source.path, "bad_table", f"not a readable table ({type(exc).__name__})"
        ) from None


def _floats(column: pa.ChunkedArray) -> Floats:
    """Expression values; missing or non-numeric ones are NaN (dropped later, like infinities).

    A float column is Arrow's parse: the same double as pandas' for every number (checked on
    hostile and random text; only an integer "-0" differs, in a sign no sum keeps). A text column
    (its file had a cell Arrow could not parse) goes through pandas' more lenient `to_numeric`,
    the reference for what counts as a number."""
    if pa.types.is_floating(column.type):
        array = column.combine_chunks()
        values: Floats = arrow_view(array, np.float64).copy()
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


def arrow_view(array: pa.Array, dtype: type[Any]) -> npt.NDArray[Any]:
    """The values of a fixed-width Arrow array (under a null: whatever is there), read-only."""
    offset = array.offset * np.dtype(dtype).itemsize
    return np.frombuffer(array.buffers()[1], dtype=dtype, count=len(array), offset=offset)


def arrow_codes(codes: Codes) -> pa.Array:
    data = pa.py_buffer(np.ascontiguousarray(codes, dtype=np.int64))
    return pa.Array.from_buffers(pa.int64(), len(codes), [None, data])


def dictionary_codes(column: pa.ChunkedArray) -> tuple[pa.Array, Codes, Flags]:
    """The distinct values of a text column, sorted; each cell's index among them; which of
    them are not "" (a cell without an ID)."""
    encoded = column.combine_chunks().dictionary_encode()  # int32 indices, no nulls
    order = pc.array_sort_indices(encoded.dictionary)
    rank = np.empty(len(order), dtype=np.int64)
    rank[arrow_view(order, np.uint64)] = np.arange(len(order))
    ids = encoded.dictionary.take(order)
    named = np.ones(len(ids), dtype=np.bool_)
    named[:1] = ids[:1].to_pylist() != [""]  # "" sorts first
    return ids, rank[arrow_view(encoded.indices, np.int32)], named


def long_cells(table: pa.Table, gene: str, sample: str, expression: str) -> Cells:
    gene_ids, genes, named_genes = dictionary_codes(table[gene])
    sample_ids, samples, named_samples = dictionary_codes(table[sample])
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


def wide_cells(table: pa.Table, gene: str) -> Cells:
    gene_ids, genes, named_genes = dictionary_codes(table[gene])
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


def sorted_unique(codes: Codes, size: int) -> Codes:
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

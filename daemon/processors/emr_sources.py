"""Where EMR rows come from, a bounded piece at a time: text (CSV/TSV, maybe compressed) in
pyarrow record batches, Parquet one batch of a row group at a time after a footer check, and
.xlsx rows through openpyxl in read-only mode after a zip size check. Runs in worker processes."""

from __future__ import annotations

import csv
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq

from daemon.errors import ProcessorError
from daemon.processors.emr_scan import DELIMITERS, ScannedStream, check_quoting, table_suffix
from daemon.processors.options import EmrOptions

PARQUET_BATCH_ROWS = 1 << 16
XLSX_BATCH_ROWS = 1 << 14
_ARROW_ERRORS = (pa.ArrowInvalid, pa.ArrowNotImplementedError, pa.ArrowTypeError, OSError)


def read_pieces(path: Path, options: EmrOptions) -> Iterator[pa.Table]:
    """The table's rows in pieces of bounded size; ProcessorError names what is wrong."""
    suffix = table_suffix(path)
    if suffix == ".parquet":
        return _parquet(path, options)
    if suffix in (".xlsx", ".xlsm"):
        return _xlsx(path, options)
    return _text(path, options)


def _refuse(path: Path, reason: str, detail: str) -> ProcessorError:
    return ProcessorError(path, reason, detail)


def _text(path: Path, options: EmrOptions) -> Iterator[pa.Table]:
    with ScannedStream(path, options) as stream:
        header = stream.header
        _check_group(path, options, header.names, header.delimiter, stream.replay)
        yield pa.table({name: pa.array([], pa.string()) for name in header.names})
        try:
            reader = pacsv.open_csv(
                pa.PythonFile(stream, mode="r"),
                read_options=pacsv.ReadOptions(
                    use_threads=False,
                    block_size=2 * options.max_row_bytes,
                    encoding=header.encoding,
                ),
                parse_options=pacsv.ParseOptions(delimiter=header.delimiter),
                convert_options=pacsv.ConvertOptions(
                    column_types=dict.fromkeys(header.names, pa.string()),
                    strings_can_be_null=True,
                ),
            )
            for batch in reader:
                yield pa.Table.from_batches([batch])
        except ProcessorError:
            raise
        except (*_ARROW_ERRORS, UnicodeDecodeError) as exc:
            raise _text_error(path, exc) from None
        stream.read()  # past the end: the final checks run even if pyarrow stopped short
        if stream.quotes:
            check_quoting(stream)


def _text_error(path: Path, exc: Exception) -> ProcessorError:
    # Arrow's messages can quote a row: keep only the kind of failure.
    if "straddl" in str(exc):
        return _refuse(path, "row_too_large", "a quoted field spans more than max_row_bytes")
    return _refuse(path, "bad_table", f"not a readable table ({type(exc).__name__})")


def _check_group(
    path: Path, options: EmrOptions, names: list[str], delimiter: str, head: bytes
) -> None:
    """A missing group column under one delimiter but present under another is a wrong
    delimiter (a `;` export read as CSV), said as such."""
    group = options.group_by
    if group in names:
        return
    line = head.split(b"\n", 1)[0].decode("latin-1").rstrip("\r")
    for other in DELIMITERS:
        if other != delimiter and group in next(csv.reader([line], delimiter=other)):
            raise _refuse(path, "wrong_delimiter", f"the columns are separated by {other!r}")
    raise _refuse(path, "missing_group_column", f"no column named {group!r}")


def _parquet(path: Path, options: EmrOptions) -> Iterator[pa.Table]:
    try:
        parquet = pq.ParquetFile(path, buffer_size=1 << 20, pre_buffer=False)
        _check_footer(path, parquet.metadata, options)
        for batch in parquet.iter_batches(batch_size=PARQUET_BATCH_ROWS, use_threads=False):
            yield pa.Table.from_batches([batch])
    except ProcessorError:
        raise
    except _ARROW_ERRORS as exc:
        raise _refuse(path, "bad_table", f"not a readable table ({type(exc).__name__})") from None


def _check_footer(path: Path, meta: pq.FileMetaData, options: EmrOptions) -> None:
    """Counts and decoded sizes from the footer, before any page is read: a small zstd file of
    constant columns that decodes to gigabytes is refused here."""
    if meta.num_columns > options.max_columns:
        limit = options.max_columns
        raise _refuse(
            path, "too_many_columns", f"{meta.num_columns} columns, max_columns is {limit}"
        )
    if meta.num_rows > options.max_rows:
        raise _refuse(
            path, "too_many_rows", f"{meta.num_rows} rows, max_rows is {options.max_rows}"
        )
    decoded = 0
    for i in range(meta.num_row_groups):
        group = meta.row_group(i)
        # Declared sizes can be understated; 8 bytes a cell is a floor no encoding goes under.
        size = max(group.total_byte_size, group.num_rows * group.num_columns * 8)
        if size > options.max_row_group_bytes:
            limit = options.max_row_group_bytes
            raise _refuse(path, "decompression_bomb", f"a row group decodes past {limit} bytes")
        decoded += size
    stored = max(path.stat().st_size, 1)
    if decoded > options.max_decoded_bytes or (
        decoded > 1 << 24 and decoded / stored > options.max_ratio
    ):
        raise _refuse(path, "decompression_bomb", f"decodes to {decoded} bytes from {stored}")


def _xlsx(path: Path, options: EmrOptions) -> Iterator[pa.Table]:
    import openpyxl  # type: ignore[import-untyped]  # only workers reading spreadsheets pay

    _check_zip(path, options)
    try:
        book = openpyxl.load_workbook(path, read_only=True, data_only=True)
    except Exception as exc:  # openpyxl raises many kinds for a broken file
        raise _refuse(
            path, "bad_table", f"not a readable workbook ({type(exc).__name__})"
        ) from None
    try:
        yield from _sheet_pieces(path, options, _sheet(path, book, options))
    finally:
        book.close()


def _check_zip(path: Path, options: EmrOptions) -> None:
    """An .xlsx is a zip: its members' declared sizes (zipfile enforces them while inflating)
    are checked against the caps before openpyxl opens it."""
    try:
        with zipfile.ZipFile(path) as archive:
            decoded = sum(info.file_size for info in archive.infolist())
    except (zipfile.BadZipFile, OSError):
        raise _refuse(path, "bad_table", "not a readable workbook (not a zip)") from None
    stored = max(path.stat().st_size, 1)
    if decoded > min(options.max_xlsx_bytes, options.max_decoded_bytes) or (
        decoded > 1 << 24 and decoded / stored > options.max_ratio
    ):
        raise _refuse(path, "decompression_bomb", f"decodes to {decoded} bytes from {stored}")


def _sheet(path: Path, book: Any, options: EmrOptions) -> Any:
    if options.sheet is None:
        return book.worksheets[0]
    if options.sheet not in book.sheetnames:
        raise _refuse(path, "missing_sheet", f"no sheet named {options.sheet!r}")
    return book[options.sheet]


def _sheet_pieces(path: Path, options: EmrOptions, sheet: Any) -> Iterator[pa.Table]:
    rows = sheet.iter_rows(values_only=True)
    header = next(rows, None)
    if header is None or not any(v is not None for v in header):
        raise _refuse(path, "empty", "no header row")
    while header and header[-1] is None:
        header = header[:-1]
    if len(header) > options.max_columns:
        limit = options.max_columns
        raise _refuse(path, "too_many_columns", f"{len(header)} columns, max_columns is {limit}")
    names = ["" if v is None else str(v).strip() for v in header]
    if len(set(names)) != len(names) or not all(names):
        raise _refuse(path, "bad_header", "empty or duplicate column names")
    if options.group_by not in names:
        raise _refuse(path, "missing_group_column", f"no column named {options.group_by!r}")
    piece: list[tuple[Any, ...]] = []
    for count, row in enumerate(rows, 1):
        if count > options.max_rows:
            raise _refuse(path, "too_many_rows", f"more than max_rows ({options.max_rows})")
        if any(v is not None for v in row[len(names) :]):
            raise _refuse(path, "bad_table", "a row is wider than the header")
        piece.append(tuple(row[: len(names)]) + (None,) * (len(names) - len(row)))
        if len(piece) == XLSX_BATCH_ROWS:
            yield _cells_table(names, piece)
            piece = []
    if piece:
        yield _cells_table(names, piece)


def _cells_table(names: list[str], rows: list[tuple[Any, ...]]) -> pa.Table:
    columns = {}
    for i, name in enumerate(names):
        values = [row[i] for row in rows]
        numbers = all(v is None or (isinstance(v, int | float) and not isinstance(v, bool))
                      for v in values)  # fmt: skip
        if numbers:
            columns[name] = pa.array(values, pa.float64())
        else:
            columns[name] = pa.array(
                [None if v is None or v == "" else str(v) for v in values], pa.string()
            )
    return pa.table(columns)

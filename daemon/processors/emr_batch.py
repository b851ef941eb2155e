"""Many small EMR files in one parse: the batch path of `EmrProcessor.read_many`. Worker only.

Parsing a 50-row CSV costs pyarrow about a millisecond of fixed overhead; parsing a whole batch
of them joined into one buffer costs a few microseconds a file. Files join only where the result
is provably the same as reading each alone: small, plain UTF-8 text without quotes, BOM or CR
(so a line is a row), the same header line, and, after the joined parse, no column that came out
as text other than the group and identifier columns (per-file type inference could have differed
there). Anything else takes the per-file path, which also names the one bad file of a group whose
joined parse fails.
"""

from __future__ import annotations

import io
import os
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Protocol

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv

from daemon.errors import ProcessorError
from daemon.models import Facts
from daemon.processors import emr_stats
from daemon.processors.emr_fold import complete_rows, file_facts, plan_columns, to_number
from daemon.processors.emr_scan import COMPRESSED, sniff_delimiter
from daemon.processors.options import EmrOptions
from daemon.processors.tables import is_numeric


class EmrProcessor(Protocol):
    """What the batch path needs of the processor (a protocol: no import loop with emr.py)."""

    options: EmrOptions
    keep_values: bool

    def read(self, path: Path, name: str) -> tuple[Any, Facts]: ...


FILE_COLUMN = "__medbatch_file__"
# Larger files gain nothing from joining, and may hold lines only the full scan can judge.
MAX_JOIN_BYTES = 1 << 20
# Tables that are never joined: other formats, and text only its own scan can decode.
_ALONE_SUFFIXES = (".parquet", ".tsv", ".tab", ".xlsx", ".xlsm", *COMPRESSED)
# One joined parse holds this much text at most (a few times that once parsed).
MAX_SHARE_BYTES = 16 << 20

Outcome = Facts | ProcessorError
_Group = list[tuple[int, bytes]]  # (item index, body lines already suffixed with the index)


def read_batch(
    processor: EmrProcessor, items: Sequence[tuple[Path, str]]
) -> tuple[list[Any], list[Outcome]]:
    """Partials (any number) and one outcome per item, in order.

    Partials come back in the order of their first item, as reading file by file would give
    them: the result's columns appear in the order the files first bring them.
    """
    outcomes: list[Outcome | None] = [None] * len(items)
    partials: list[tuple[int, Any]] = []
    groups: dict[bytes, _Group] = defaultdict(list)
    for index, (path, _) in enumerate(items):
        prepared = _prepare(processor, path, index)
        if prepared is None:
            _read_one(processor, items, index, partials, outcomes)
        else:
            header, body = prepared
            groups[header].append((index, body))
    for header, members in groups.items():
        for share in _shares(members):
            if len(share) == 1 or not _read_group(
                processor, items, header, share, partials, outcomes
            ):
                for index, _ in share:
                    _read_one(processor, items, index, partials, outcomes)
    assert all(o is not None for o in outcomes)
    partials.sort(key=lambda placed: placed[0])
    return [p for _, p in partials], [o for o in outcomes if o is not None]


def _shares(members: _Group) -> list[_Group]:
    """Members cut into joined parses of at most MAX_SHARE_BYTES: memory stays bounded
    whatever the batch's size."""
    shares: list[_Group] = [[]]
    size = 0
    for member in members:
        if shares[-1] and size + len(member[1]) > MAX_SHARE_BYTES:
            shares.append([])
            size = 0
        shares[-1].append(member)
        size += len(member[1])
    return shares


def _read_one(
    processor: EmrProcessor,
    items: Sequence[tuple[Path, str]],
    index: int,
    partials: list[Any],
    outcomes: list[Outcome | None],
) -> None:
    path, name = items[index]
    try:
        partial, facts = processor.read(path, name)
    except ProcessorError as exc:
        outcomes[index] = exc
        return
    partials.append((index, partial))
    outcomes[index] = facts


def _prepare(processor: EmrProcessor, path: Path, index: int) -> tuple[bytes, bytes] | None:
    """(header line, body with the item index appended to each row), or None: read it alone."""
    options = processor.options
    if (
        path.name.lower().endswith(_ALONE_SUFFIXES)
        or options.field_delimiter not in (None, ",")
        or options.decimal != "."
        or options.encoding not in ("utf-8", "auto")
    ):
        return None
    data = _small_file(path, min(MAX_JOIN_BYTES, processor.options.max_row_bytes))
    if data is None:
        return None
    if any(mark in data for mark in (b'"', b"\r", b"\x00")) or data.startswith(b"\xef\xbb\xbf"):
        return None
    if not data.isascii():
        try:
            data.decode("utf-8")
        except UnicodeDecodeError:
            return None
    header, _, body = data.partition(b"\n")
    if not header.strip():
        return None
    suffix = b",%d\n" % index
    if not body.endswith(b"\n"):
        body += b"\n"
    if body.startswith(b"\n") or b"\n\n" in body:  # empty lines are no rows: drop them
        body = b"".join(line + b"\n" for line in body.split(b"\n") if line)
    if body.count(b"\n") > options.max_rows:
        return None
    return header, body.replace(b"\n", suffix)  # one C call, not one per row


def _small_file(path: Path, limit: int) -> bytes | None:
    """The bytes of a non-empty file of at most `limit` bytes, in one read; else None."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return None
    try:
        size = os.fstat(fd).st_size
        data = os.read(fd, size + 1) if 0 < size <= limit else b""
    except OSError:
        return None
    finally:
        os.close(fd)
    return data if data and len(data) == size else None  # grown or cut meanwhile: read alone


def _read_group(
    processor: EmrProcessor,
    items: Sequence[tuple[Path, str]],
    header: bytes,
    members: _Group,
    partials: list[tuple[int, Any]],
    outcomes: list[Outcome | None],
) -> bool:
    """Parse the group as one table; False when it must be read file by file instead."""
    options = processor.options
    path = items[members[0][0]][0]
    if sniff_delimiter(path, header.decode("utf-8")) != ",":
        return False
    names = header.decode("utf-8").split(",")
    group = options.group_by
    if (
        len(names) > options.max_columns
        or len(set(names)) != len(names)
        or not all(names)
        or FILE_COLUMN in names
        or group not in names
    ):
        return False  # the per-file path says precisely what is wrong with each file
    plan = plan_columns(options, names)
    if plan.required is not None and not plan.required <= set(names):
        return False
    text_columns = [c for c in names if c not in plan.values]
    buffer = b"".join([header, b",", FILE_COLUMN.encode(), b"\n", *(b for _, b in members)])
    try:
        table = pacsv.read_csv(
            io.BytesIO(buffer),
            read_options=pacsv.ReadOptions(use_threads=False),
            convert_options=pacsv.ConvertOptions(
                column_types={**dict.fromkeys(text_columns, pa.string()), FILE_COLUMN: pa.int64()},
                strings_can_be_null=True,
            ),
        )
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
        return False
    if not all(_inferred_number(table[c].type) for c in plan.values):
        return False  # a file alone might have inferred a number there: stay exact
    complete = table.filter(complete_rows(table, plan.required or {group}))
    columns = {c: to_number(complete[c], ".")[0] for c in plan.values}
    columns[group] = pc.cast(complete[group], pa.string())
    columns[FILE_COLUMN] = complete[FILE_COLUMN]
    partial = emr_stats.reduce(
        pa.table(columns), group, plan.values, processor.keep_values, FILE_COLUMN
    )
    partials.append((members[0][0], partial))
    _record_facts(processor, table, complete, group, members, outcomes, plan.withheld)
    return True


def _inferred_number(kind: pa.DataType) -> bool:
    return is_numeric(kind) or pa.types.is_null(kind)


def _record_facts(
    processor: EmrProcessor,
    table: pa.Table,
    complete: pa.Table,
    group: str,
    members: _Group,
    outcomes: list[Outcome | None],
    withheld: int,
) -> None:
    rows = _counts(table[FILE_COLUMN])
    kept = _counts(complete[FILE_COLUMN])
    pairs = (
        complete.select([FILE_COLUMN, group])
        .group_by([FILE_COLUMN, group], use_threads=False)
        .aggregate([])
    )
    groups = _counts(pairs[FILE_COLUMN])
    for index, _ in members:
        outcomes[index] = file_facts(
            processor.options,
            rows.get(index, 0),
            kept.get(index, 0),
            groups.get(index, 0),
            withheld,
        )


def _counts(column: pa.ChunkedArray) -> dict[int, int]:
    counted = pc.value_counts(column)
    return dict(
        zip(counted.field("values").to_pylist(), counted.field("counts").to_pylist(), strict=True)
    )

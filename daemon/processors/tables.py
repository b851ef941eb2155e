"""Table helpers shared by the processors (worker side): the CSV-injection rule, numeric types,
which column names may become result headers, and small result tables written without pandas."""

from __future__ import annotations

import csv
import math
import re
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import pyarrow as pa

FORMULA_PREFIXES = ("=", "+", "-", "@", "\t", "\r")
# Spreadsheets skip these before a formula, or read them as the ASCII sign: fullwidth signs,
# spaces, and zero-width characters (and a BOM) must not hide a prefix.
_FULLWIDTH = ("\uff1d", "\uff0b", "\uff0d", "\uff20", "\ufe62", "\ufe63", "\u2212")
_INVISIBLE = " \u00a0\u2000\u2001\u2002\u2003\u2009\u200a\u200b\u200c\u200d\u2060\u3000\ufeff\n"
# A header that is itself patient data: a date ("1984-03-02"), a long number (an MRN), an
# e-mail, or words shaped like a person's name ("Doe, John", "John Smith").
_LOOKS_PERSONAL = re.compile(
    r"\d{1,4}[-/.]\d{1,2}[-/.]\d{1,4}|\d{4,}|@"
    r"|^\s*[A-Z][a-z'\u2019-]+,?\s+[A-Z][a-z'\u2019-]+(\s+[A-Z][a-z'\u2019-]+)?\s*$"
)
_PLAIN = re.compile(r"^[A-Za-z][A-Za-z0-9 _.()%/#-]{0,63}$")


def neutralise(text: str) -> str:
    """OWASP CSV-injection rule: a text cell that a spreadsheet would run gets a leading quote,
    also when the sign is fullwidth or follows spaces or zero-width characters."""
    if text.startswith(FORMULA_PREFIXES):
        return "'" + text
    shown = text.lstrip(_INVISIBLE)
    return "'" + text if shown.startswith(FORMULA_PREFIXES + _FULLWIDTH) else text


def is_numeric(kind: pa.DataType) -> bool:
    return bool(
        pa.types.is_integer(kind) or pa.types.is_floating(kind) or pa.types.is_decimal(kind)
    )


def is_publishable_header(name: str) -> bool:
    """A column name that may be printed in a result or manifest: plain, short, and not shaped
    like patient data. Operators can still name any column explicitly in `columns`."""
    return bool(_PLAIN.match(name)) and not _LOOKS_PERSONAL.search(name)


def write_small_csv(
    path: Path,
    rows: Iterable[Mapping[str, object]],
    columns: tuple[str, ...],
    *,
    ints: tuple[str, ...],
    floats: tuple[str, ...],
) -> None:
    """One row per mapping (a missing key is empty): `ints` and `floats` bare, every other
    column a neutralised, quoted text. The bytes pandas' `to_csv(quoting=QUOTE_NONNUMERIC)`
    writes for `Int64`/`float64`/text columns, without loading pandas in a worker that only
    needs a table of a few hundred rows."""
    kinds = [int if c in ints else float if c in floats else str for c in columns]
    with path.open("w", encoding="utf-8", newline="") as out:
        writer = csv.writer(out, quoting=csv.QUOTE_NONNUMERIC, lineterminator="\n")
        writer.writerow(columns)
        writer.writerows(
            [_cell(row.get(c), kind) for c, kind in zip(columns, kinds, strict=True)]
            for row in rows
        )


def _cell(value: Any, kind: type) -> object:
    if value is None:
        return None  # written as "" (an empty quoted cell), as pandas writes a missing value
    if kind is str:
        return neutralise(str(value))
    if math.isnan(float(value)):
        return None
    return kind(value)

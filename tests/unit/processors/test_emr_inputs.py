"""Real exports in, bombs out: encodings, delimiters, decimal commas, .xlsx, compressed text
within caps (the header read from the decoded stream), Parquet checked from its footer."""

from __future__ import annotations

import bz2
import gzip
import lzma
import struct
import zipfile
from pathlib import Path
from typing import Any

import openpyxl
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from daemon.errors import ProcessorError
from daemon.processors.emr import EmrProcessor
from daemon.processors.options import EmrOptions

ROWS = [("Fièvre", 38.5, "Müller"), ("Grippe", 39.0, "Zoë"), ("Fièvre", 37.5, "Ærø")]


def export(delimiter: str = ",", decimal: str = ".") -> str:
    lines = [delimiter.join(["diagnosis", "temp", "ward"])]
    lines += [delimiter.join([d, str(t).replace(".", decimal), w]) for d, t, w in ROWS]
    return "\r\n".join(lines) + "\r\n"


def read(path: Path, **options: Any) -> tuple[Any, Any]:
    proc = EmrProcessor(EmrOptions(min_cell_size=1, category_columns=("ward",), **options))
    partial, facts = proc.read(path, path.name)
    return partial, facts


def means(partial: Any) -> dict[str, float]:
    return {str(g): row["sum:temp"] / row["count:temp"] for g, row in partial.iterrows()}


EXPECTED = {"Fièvre": 38.0, "Grippe": 39.0}


@pytest.mark.parametrize(
    ("encoding", "options"),
    [
        ("cp1252", {"encoding": "cp1252"}),
        ("cp1252", {"encoding": "auto"}),
        ("latin-1", {"encoding": "latin-1"}),
        ("utf-8", {"encoding": "auto"}),
        ("utf-8-sig", {}),
        ("utf-8-sig", {"encoding": "auto"}),
    ],
)
@pytest.mark.parametrize(
    ("delimiter", "decimal"), [(";", ","), (",", "."), ("\t", "."), ("|", ",")]
)
def test_exports_in_any_encoding_and_delimiter_are_read(
    tmp_path: Path, encoding: str, options: dict[str, Any], delimiter: str, decimal: str
) -> None:
    """A European `;` export in cp1252 with decimal commas, and its relatives: labels decoded,
    delimiter sniffed, values exact."""
    path = tmp_path / "export.csv"
    path.write_bytes(export(delimiter, decimal).encode(encoding))
    partial, _ = read(path, decimal=decimal, **options)
    assert means(partial) == EXPECTED


@pytest.mark.parametrize(
    ("encoding", "options", "reason", "hint"),
    [
        ("cp1252", {}, "not_utf8", "cp1252"),
        ("latin-1", {}, "not_utf8", "cp1252"),
        ("utf-16", {"encoding": "auto"}, "not_text", ""),
    ],
)
def test_a_wrong_encoding_says_what_to_try(
    tmp_path: Path, encoding: str, options: dict[str, Any], reason: str, hint: str
) -> None:
    path = tmp_path / "export.csv"
    path.write_bytes(export(";", ",").encode(encoding))
    with pytest.raises(ProcessorError) as info:
        read(path, decimal=",", **options)
    assert info.value.reason == reason
    assert hint in info.value.detail


@pytest.mark.parametrize("used", [";", "\t", "|"])
def test_a_wrong_delimiter_is_named(tmp_path: Path, used: str) -> None:
    """delimiter = "," on a `;` (tab, pipe) export: `wrong_delimiter`, not a missing column."""
    path = tmp_path / "export.csv"
    path.write_bytes(export(used).encode())
    with pytest.raises(ProcessorError) as info:
        read(path, delimiter=",")
    assert info.value.reason == "wrong_delimiter"


def write_xlsx(path: Path, sheets: dict[str, list[tuple[Any, ...]]]) -> None:
    book = openpyxl.Workbook()
    book.remove(book.active)
    for title, rows in sheets.items():
        sheet = book.create_sheet(title)
        for row in rows:
            sheet.append(row)
    book.save(path)


def test_xlsx_first_sheet_or_named_sheet(tmp_path: Path) -> None:
    rows = [("diagnosis", "temp", "ward"), *ROWS]
    path = tmp_path / "export.xlsx"
    write_xlsx(path, {"Summary": [("nothing", "here")], "Data": rows})
    partial, facts = read(path, sheet="Data")
    assert means(partial) == EXPECTED and facts["rows"] == 3
    with pytest.raises(ProcessorError) as info:
        read(path)  # the first sheet has no diagnosis column
    assert info.value.reason == "missing_group_column"
    with pytest.raises(ProcessorError) as info:
        read(path, sheet="Missing")
    assert info.value.reason == "missing_sheet"


@pytest.mark.parametrize(
    "content", [b"not a zip at all", b"PK\x03\x04" + b"\x00" * 64], ids=["text", "cut-zip"]
)
def test_a_broken_xlsx_is_refused_with_a_reason(tmp_path: Path, content: bytes) -> None:
    path = tmp_path / "broken.xlsx"
    path.write_bytes(content)
    with pytest.raises(ProcessorError) as info:
        read(path)
    assert info.value.reason == "bad_table"


def test_an_xlsx_that_inflates_past_its_cap_is_refused_before_opening(tmp_path: Path) -> None:
    """A workbook padded with 40 MiB of zeros (a few KiB zipped): refused by the ratio cap and
    by max_xlsx_bytes, from the zip's declared sizes, before openpyxl reads it."""
    path = tmp_path / "padded.xlsx"
    write_xlsx(path, {"Data": [("diagnosis", "temp"), ("flu", 1.0)]})
    with zipfile.ZipFile(path, "a", compression=zipfile.ZIP_DEFLATED) as archive:
        archive.writestr("xl/media/pad.bin", bytes(40 << 20))
    for options in ({}, {"max_xlsx_bytes": 1 << 20, "max_ratio": 10**6}):
        with pytest.raises(ProcessorError) as info:
            read(path, **options)
        assert info.value.reason == "decompression_bomb"


def zstd(data: bytes) -> bytes:
    return pa.Codec("zstd").compress(data, asbytes=True)


COMPRESSORS = {".gz": gzip.compress, ".bz2": bz2.compress, ".xz": lzma.compress, ".zst": zstd}


@pytest.mark.parametrize("suffix", sorted(COMPRESSORS))
def test_compressed_text_is_read_or_refused_by_option(tmp_path: Path, suffix: str) -> None:
    path = tmp_path / f"export.csv{suffix}"
    path.write_bytes(COMPRESSORS[suffix](export().encode()))
    assert means(read(path)[0]) == EXPECTED
    with pytest.raises(ProcessorError) as info:
        read(path, compressed="refuse")
    assert info.value.reason == "compressed"


@pytest.mark.parametrize("suffix", sorted(COMPRESSORS))
def test_a_compression_bomb_is_stopped_while_inflating(tmp_path: Path, suffix: str) -> None:
    """24 MiB of one repeated row from a few KiB: refused by the ratio cap, and by the size cap."""
    bomb = b"diagnosis,temp\n" + b"flu,1\n" * ((24 << 20) // 6)
    path = tmp_path / f"bomb.csv{suffix}"
    path.write_bytes(COMPRESSORS[suffix](bomb))
    for options in ({}, {"max_decoded_bytes": 1 << 20, "max_ratio": 10**6}):
        with pytest.raises(ProcessorError) as info:
            read(path, **options)
        assert info.value.reason == "decompression_bomb"


def test_a_skippable_zstd_frame_cannot_hide_the_header(tmp_path: Path) -> None:
    """A skippable frame holding a harmless header, then the real data: the header checked is
    the decoded one (here too wide), not the raw bytes."""
    decoy = b"diagnosis,temp\nflu,1\n"
    skippable = struct.pack("<II", 0x184D2A50, len(decoy)) + decoy
    real = ",".join(f"c{i}" for i in range(50)).encode() + b",diagnosis\n"
    path = tmp_path / "hidden.csv.zst"
    path.write_bytes(skippable + zstd(real))
    with pytest.raises(ProcessorError) as info:
        read(path, max_columns=20)
    assert info.value.reason == "too_many_columns"


@pytest.mark.parametrize("rows", [4_000_000, 20_000_000])
def test_a_parquet_decompression_bomb_is_refused_from_its_footer(tmp_path: Path, rows: int) -> None:
    """Constant columns in zstd: a few KiB on disk, hundreds of MiB decoded; refused before a
    page is read."""
    path = tmp_path / "bomb.parquet"
    table = pa.table({"diagnosis": pa.repeat("flu", rows), "temp": pa.repeat(1.0, rows)})
    pq.write_table(table, path, compression="zstd", row_group_size=rows)
    assert path.stat().st_size < 1 << 20
    with pytest.raises(ProcessorError) as info:
        read(path)
    assert info.value.reason == "decompression_bomb"


def test_parquet_is_read_a_batch_at_a_time_exactly(tmp_path: Path) -> None:
    path = tmp_path / "t.parquet"
    n = 200_000
    table = pa.table({"diagnosis": ["a", "b"] * (n // 2), "temp": [float(i) for i in range(n)]})
    pq.write_table(table, path, row_group_size=30_000)
    partial, facts = read(path)
    assert facts["rows"] == n
    assert means(partial) == {"a": (n - 2) / 2, "b": n / 2}

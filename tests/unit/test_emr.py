"""EMR processor: hostile tables refused before parsing, identifiers never averaged, small cells
suppressed, formula cells neutralised, with exact expected output."""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from pydantic import ValidationError

from daemon.errors import ProcessorError
from daemon.processors.emr import EmrProcessor
from daemon.processors.options import EmrOptions, is_person_identifier
from daemon.processors.tables import neutralise


def processor(**options: Any) -> EmrProcessor:
    return EmrProcessor(EmrOptions(**options))


def publish(proc: EmrProcessor, tmp_path: Path, *tables: bytes) -> str:
    partials = []
    for i, table in enumerate(tables):
        path = tmp_path / f"in{i}.csv"
        path.write_bytes(table)
        partials.append(proc.read(path, path.name)[0])
    out = tmp_path / "out"
    out.mkdir(exist_ok=True)
    (name,) = proc.write(proc.merge(partials), out)
    return (out / name).read_bytes().decode()


def table(groups: list[tuple[str, int, float]]) -> bytes:
    lines = ["patient_id,diagnosis,age"]
    lines += [f"{i:06d},{g},{v}" for g, n, v in groups for i in range(n)]
    return ("\n".join(lines) + "\n").encode()


def refusal(tmp_path: Path, content: bytes, name: str = "t.csv", **options: Any) -> str:
    path = tmp_path / name
    path.write_bytes(content)
    with pytest.raises(ProcessorError) as info:
        processor(**options).read(path, name)
    assert str(tmp_path) not in info.value.detail
    return info.value.reason


@pytest.mark.parametrize(
    ("content", "options", "reason"),
    [
        (b"", {}, "empty"),
        (b"\n\n", {}, "empty"),
        (b"diagnosis,age\nflu,\x00\n", {}, "not_text"),
        ("diagnosis\ncafé\n".encode("latin-1"), {}, "not_utf8"),
        (b"diagnosis\ncaf\xc3", {}, "not_utf8"),
        (b"diagnosis,note\nflu," + b"x" * 2000 + b"\n", {"max_row_bytes": 1024}, "row_too_large"),
        (b"a,b,c,d\n1,2,3,4\n", {"max_columns": 3}, "too_many_columns"),
        (b"diagnosis\n" + b"flu\n" * 4, {"max_rows": 3}, "too_many_rows"),
        (b"diagnosis\n" + b"flu\n" * 3 + b"flu", {"max_rows": 3}, "too_many_rows"),
        (b'diagnosis,age\nflu,"1\nflu,2\n', {}, "unterminated_quote"),
        (b'diagnosis,age\nflu,"1"x\nflu,"2"\n', {}, "bad_quoting"),
        (b"diagnosis,diagnosis\nflu,flu\n", {}, "bad_header"),
        (b"diagnosis,age\nflu,1\nflu,2,3\n", {}, "bad_table"),
        (b"age\n1\n", {}, "missing_group_column"),
    ],
    ids=[
        "empty",
        "blank",
        "nul",
        "latin1",
        "cut-utf8",
        "long-line",
        "wide",
        "rows",
        "rows-no-eol",
        "unterminated",
        "stray-quote",
        "dup-header",
        "ragged",
        "no-group",
    ],
)
def test_hostile_tables_are_refused_with_a_reason(
    tmp_path: Path, content: bytes, options: dict[str, Any], reason: str
) -> None:
    assert refusal(tmp_path, content, **options) == reason


def test_a_field_longer_than_a_line_may_be_is_refused_cheaply(tmp_path: Path) -> None:
    """10 MB in one field: refused by the byte scan, never handed to the parser."""
    content = b"diagnosis,note\nflu," + b"y" * (10 << 20) + b"\n"
    assert refusal(tmp_path, content) == "row_too_large"


def test_a_quoted_field_spanning_lines_is_bounded_by_the_block(tmp_path: Path) -> None:
    """Short lines, but one quoted field of many lines: pyarrow's block size still bounds it."""
    content = b'diagnosis,note\nflu,"' + b"z\n" * 3000 + b'"\n'
    assert refusal(tmp_path, content, max_row_bytes=1024) == "row_too_large"


def test_binary_garbage_is_not_text(tmp_path: Path) -> None:
    garbage = random.Random(1).randbytes(1 << 16)
    assert refusal(tmp_path, garbage) in {"not_text", "not_utf8"}


def test_parquet_limits_come_from_the_footer(tmp_path: Path) -> None:
    path = tmp_path / "t.parquet"
    pq.write_table(pa.table({"diagnosis": ["a"] * 5, "age": [1] * 5}), path)
    with pytest.raises(ProcessorError) as info:
        processor(max_rows=4).read(path, "t.parquet")
    assert info.value.reason == "too_many_rows"
    with pytest.raises(ProcessorError) as info:
        processor(max_columns=1).read(path, "t.parquet")
    assert info.value.reason == "too_many_columns"


def test_a_bom_is_read_not_refused(tmp_path: Path) -> None:
    result = publish(processor(min_cell_size=1), tmp_path, b"\xef\xbb\xbf" + table([("a", 2, 3)]))
    assert result == '"diagnosis","n","mean_age","suppressed"\n"a",2,3.0,false\n'


def test_identifiers_in_any_spelling_are_never_averaged(tmp_path: Path) -> None:
    """ "Patient ID", "MRN", "zip": numbers, but identifiers; only age is averaged."""
    content = b"Patient ID,MRN,zip,diagnosis,age\n" + b"1,2,3,flu,4\n" * 11
    result = publish(processor(), tmp_path, content)
    assert result == '"diagnosis","n","mean_age","suppressed"\n"flu",11,4.0,false\n'


@pytest.mark.parametrize("spelling", ["patient_id", "Patient ID", "PATIENT-ID", "mrn", "Email"])
def test_grouping_by_an_identifier_is_refused(spelling: str) -> None:
    with pytest.raises(ValidationError, match=r"group_by: .* is an identifier column"):
        EmrOptions(group_by=spelling)
    assert is_person_identifier(spelling)


def test_small_cells_blank(tmp_path: Path) -> None:
    """Groups under min_cell_size: label, n and means withheld, suppressed true, listed last."""
    result = publish(processor(), tmp_path, table([("a", 11, 1.5), ("b", 10, 2), ("c", 3, 3)]))
    assert result == (
        '"diagnosis","n","mean_age","suppressed"\n"a",11,1.5,false\n"","","",true\n"","","",true\n'
    )


def test_a_single_small_cell_takes_the_smallest_other_with_it(tmp_path: Path) -> None:
    """Row counts are in the manifest: one blank cell alone could be recovered by subtraction."""
    result = publish(processor(), tmp_path, table([("a", 30, 1), ("b", 12, 2), ("c", 1, 9)]))
    assert result == (
        '"diagnosis","n","mean_age","suppressed"\n"a",30,1.0,false\n"","","",true\n"","","",true\n'
    )


def test_small_cells_merge_until_other_is_no_small_cell(tmp_path: Path) -> None:
    proc = processor(small_cells="merge")
    result = publish(proc, tmp_path, table([("a", 20, 1), ("b", 12, 2), ("c", 4, 4), ("d", 2, 7)]))
    # c and d are 6 rows: b (the smallest shown) joins them, 18 rows of mean (24+14+24)/18
    assert result == (
        '"diagnosis","n","mean_age","suppressed"\n"a",20,1.0,false\n'
        f'"other",18,{(24 + 16 + 14) / 18!r},false\n'
    )


def test_merge_of_everything_small_is_still_suppressed(tmp_path: Path) -> None:
    result = publish(processor(small_cells="merge"), tmp_path, table([("a", 3, 1), ("b", 2, 2)]))
    assert result == '"diagnosis","n","mean_age","suppressed"\n"other","","",true\n'


def test_a_mean_over_too_few_values_is_blank(tmp_path: Path) -> None:
    """n is large, but only 2 rows have a glucose value: that mean is a small cell too."""
    lines = ["diagnosis,age,glucose"] + [f"flu,{i},{'5' if i < 2 else ''}" for i in range(12)]
    proc = processor(required_columns=["diagnosis", "age"])
    result = publish(proc, tmp_path, ("\n".join(lines) + "\n").encode())
    assert (
        result == '"diagnosis","n","mean_age","mean_glucose","suppressed"\n"flu",12,5.5,"",false\n'
    )


def test_means_are_exact_over_files_and_suppression_is_off_at_1(tmp_path: Path) -> None:
    one = table([("a", 1, -1.23)])
    two = table([("a", 1, -1.23), ("b", 1, 2.5)])
    assert publish(processor(min_cell_size=1), tmp_path, one, two) == (
        '"diagnosis","n","mean_age","suppressed"\n"a",2,-1.23,false\n"b",1,2.5,false\n'
    )


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("=1+1", "'=1+1"),
        ("+1", "'+1"),
        ("-1.23", "'-1.23"),
        ("@SUM(A1)", "'@SUM(A1)"),
        ("\tx", "'\tx"),
        ("\rx", "'\rx"),
        ("plain", "plain"),
        ("a=b", "a=b"),
        (" =1+1", "' =1+1"),
        ("\u00a0\u00a0@SUM(A1)", "'\u00a0\u00a0@SUM(A1)"),
        ("\u200b=cmd", "'\u200b=cmd"),
        ("\ufeff+1", "'\ufeff+1"),
        ("\uff1dHYPERLINK()", "'\uff1dHYPERLINK()"),
        ("\uff0b1", "'\uff0b1"),
        ("\uff20x", "'\uff20x"),
        ("\u2212" + "1", "'\u22121"),
        ("\n=1", "'\n=1"),
        (" plain", " plain"),
        ("e-mail", "e-mail"),
    ],
)
def test_neutralise(text: str, expected: str) -> None:
    assert neutralise(text) == expected


def test_formula_labels_are_neutralised_and_cr_stays_quoted(tmp_path: Path) -> None:
    content = b'diagnosis,age\n"\r=cmd",-1.5\n=1+1,2\n'
    result = publish(processor(min_cell_size=1), tmp_path, content)
    assert result == (
        '"diagnosis","n","mean_age","suppressed"\n"\'\r=cmd",1,-1.5,false\n"\'=1+1",1,2.0,false\n'
    )

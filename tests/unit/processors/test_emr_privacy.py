"""Small cells stay small: identifiers found by pattern (never grouped by, averaged or
published), headers that are patient data withheld, suppressed labels withheld, per-file counts
coarsened, and `min_cell_sources` against padding a victim's group."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pandas as pd
import pytest
from pydantic import ValidationError

from daemon.processors.options import EmrOptions, is_code, is_person_identifier
from daemon.processors.tables import is_publishable_header
from tests.unit.processors.emr_run import emr_result

PERSON = [
    "full_name", "PatientsName", "Patient MRN", "Phone Number", "Home Address", "E-mail Address",
    "national_id", "medicare_number", "name", "ID", "Surname", "first-name", "DOB",
    "Date of Birth", "birthDate", "SSN", "NHS No", "ZIP", "Postcode", "patientId", "subject_id",
    "Mobile", "Fax", "Street", "Insurance Number", "Medical Record Number", "passportNo",
]  # fmt: skip
NOT_PERSON = ["diagnosis", "age", "systolic_bp", "drug_name", "Test Name", "patient_age",
              "ward", "glucose", "heart_rate", "sex"]  # fmt: skip
CODES = ["ward_code", "ward_id", "ICD10", "visit no", "specimen_number", "DeviceUID"]


@pytest.mark.parametrize("column", PERSON)
def test_person_identifiers_are_found_by_pattern(column: str) -> None:
    assert is_person_identifier(column)
    with pytest.raises(ValidationError, match="identifier"):
        EmrOptions(group_by=column)


@pytest.mark.parametrize("column", NOT_PERSON)
def test_ordinary_columns_are_not_identifiers(column: str) -> None:
    assert not is_person_identifier(column)


@pytest.mark.parametrize("column", CODES)
def test_codes_are_never_averaged_but_may_be_grouped(column: str) -> None:
    assert is_code(column) and not is_person_identifier(column)
    EmrOptions(group_by=column)


def test_more_identifiers_can_be_declared() -> None:
    assert is_person_identifier("Bed Label", ["bed_label"])
    with pytest.raises(ValidationError, match="identifier"):
        EmrOptions(group_by="bed label", id_columns=("BED_LABEL",))


def publish(tmp_path: Path, tables: list[str], **options: Any) -> tuple[pd.DataFrame, list[Any]]:
    result, facts = emr_result(tmp_path, [t.encode() for t in tables], **options)
    return pd.read_csv(result, keep_default_na=False, dtype=str), facts


def rows(group: str, n: int, value: float = 1.0) -> list[str]:
    return [f"{group},{value},{i:07d},{i}" for i in range(n)]


def test_numeric_identifiers_are_never_averaged(tmp_path: Path) -> None:
    """Every identifier spelling holds numbers: none becomes a result column."""
    header = ",".join(["diagnosis", "age", *PERSON, *CODES])
    line = ",".join(["flu", "40"] + ["123456"] * (len(PERSON) + len(CODES)))
    result, _ = publish(tmp_path, [header + "\n" + (line + "\n") * 12])
    assert list(result.columns) == ["diagnosis", "n", "mean_age", "suppressed"]


@pytest.mark.parametrize(
    "header", ["John Smith", "Doe, John", "1984-03-02", "02/03/1984", "4471234", "j@x.org"]
)
def test_headers_that_are_patient_data_are_not_published(tmp_path: Path, header: str) -> None:
    """A column whose name is a name, a date or a number is left out, and only counted."""
    assert not is_publishable_header(header)
    quoted = '"' + header + '"'
    text = f"diagnosis,age,{quoted}\n" + "flu,40,7\n" * 12
    result, (facts,) = publish(tmp_path, [text])
    assert list(result.columns) == ["diagnosis", "n", "mean_age", "suppressed"]
    assert facts["withheld_columns"] == 1
    assert header not in str(facts)


def test_suppressed_labels_are_withheld(tmp_path: Path) -> None:
    """A rare diagnosis's label says that someone has it: withheld with its numbers."""
    text = "diagnosis,age\n" + "flu,40\n" * 20 + "asthma,30\n" * 15 + "kuru,70\n"
    result, _ = publish(tmp_path, [text])
    assert "kuru" not in result.to_csv()
    assert result.values.tolist() == [
        ["flu", "20", "40.0", "false"],
        ["", "", "", "true"],
        ["", "", "", "true"],
    ]


@pytest.mark.parametrize("victim_rows", [1, 2, 5, 10])
def test_per_file_counts_cannot_reopen_a_suppressed_cell(tmp_path: Path, victim_rows: int) -> None:
    """A file holding only a suppressed group: its counts in the manifest are rounded to a
    multiple of min_cell_size, so they do not say the cell's n."""
    victim = "diagnosis,age\n" + "kuru,70\n" * victim_rows
    rest = "diagnosis,age\n" + "flu,40\n" * 30 + "asthma,30\n" * 25
    _, facts = publish(tmp_path, [victim, rest])
    assert facts[0]["rows"] == 0 and facts[0]["rows_dropped"] == 0
    assert facts[1]["rows"] == 55 and facts[1]["rounded_to"] == 11


@pytest.mark.parametrize("padding_rows", [10, 11, 40])
def test_min_cell_sources_resists_padding(tmp_path: Path, padding_rows: int) -> None:
    """Zero rows from one file padding a victim's group past min_cell_size: with
    min_cell_sources = 3, a group with rows from two inputs stays suppressed."""
    victim = "diagnosis,age\nkuru,70\n" + "flu,40\n" * 20
    padding = "diagnosis,age\n" + "kuru,0\n" * padding_rows + "flu,40\n" * 20
    other = "diagnosis,age\n" + "flu,40\n" * 20 + "asthma,1\n" * 12
    result, _ = publish(tmp_path, [victim, padding, other], min_cell_sources=3)
    assert "kuru" not in result.to_csv()
    assert result["suppressed"].tolist().count("true") == 2  # kuru, and asthma with it
    opened, _ = publish(tmp_path, [victim, padding, other])
    assert "kuru" in opened["diagnosis"].tolist()  # the attack works without the option


@pytest.mark.parametrize(("censored", "published"), [(1, 11), (10, 11), (11, 11), (12, 22)])
def test_unparsed_counts_are_coarse_but_never_zero(
    tmp_path: Path, censored: int, published: int
) -> None:
    """Censored values are reported (never silently dropped) but rounded up, so a file of one
    small group does not say how many rows it had."""
    text = "diagnosis,crp\n" + "kuru,<0.5\n" * censored + "kuru,3\n" * 20
    _, (facts,) = publish(tmp_path, [text])
    assert facts["unparsed:crp"] == published

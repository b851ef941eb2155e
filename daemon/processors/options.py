"""Options of the built-in processors: light models, so the main process validates a config
without importing pandas, scikit-image or pydicom."""

from __future__ import annotations

import re
from collections.abc import Iterable
from typing import ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field, PositiveInt, model_validator


class _Options(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    # Whether a big batch may be read in shares on several workers and merged (each file's
    # partial stands alone). Not when reading one file depends on the batch's other files.
    reads_files_apart: ClassVar[bool] = True


# Person identifiers, matched inside the normalised name (`identifier_key`): "Patient MRN",
# "PatientsName", "E-mail Address", "medicare_number" are all caught without being listed.
PERSON_FRAGMENTS = (
    "surname", "forename", "firstname", "lastname", "givenname", "familyname", "middlename",
    "maidenname", "fullname", "patientname", "patientsname", "personname", "initials", "mrn",
    "ssn", "socialsecurity", "nationalid", "nationalinsurance", "nhsnumber", "nhsno", "medicare",
    "medicaid", "passport", "driverslicen", "driverlicen", "licensenumber", "licencenumber",
    "phone", "telephone", "mobile", "cellular", "fax", "email", "address", "street", "zipcode",
    "postcode", "postalcode", "dateofbirth", "birthdate", "birthday", "dob", "medicalrecord",
    "healthcard", "healthnumber", "insurance", "accountnumber", "accession", "beneficiary",
    "patientid", "patientnumber", "patientno", "patientkey", "patientidentifier", "personid",
    "subjectid", "recordid", "recordnumber", "encounterid", "visitid", "memberid", "clientid",
    "caseid", "casenumber", "admissionid", "episodeid", "hospitalnumber", "guarantor", "nextofkin",
)  # fmt: skip
# Whole words that identify a person on their own ("name", "zip", "id", "patient").
PERSON_WORDS = frozenset({"name", "names", "zip", "mail", "url"})
# Whole names that are a person's key ("ID" alone is a row's patient; "ward_id" is a code).
PERSON_KEYS = frozenset({"id", "pid", "patient", "person", "subject", "client"})
# "name" next to one of these names a thing, not a person ("drug_name", "Test Name").
THING_WORDS = frozenset(
    {"drug", "test", "ward", "hospital", "unit", "facility", "department", "medication",
     "procedure", "lab", "site", "study", "file", "device", "diagnosis", "product", "brand",
     "trial", "clinic", "organism", "gene", "specimen", "series", "protocol", "code", "group"}
)  # fmt: skip
# Codes: never averaged (a mean of ward codes means nothing), but they may be grouped by.
CODE_WORDS = frozenset({"id", "ids", "uid", "uuid", "code", "codes", "number", "no", "num",
                        "nr", "key", "identifier", "icd", "zip"})  # fmt: skip
_CAMEL = re.compile(r"(?<=[a-z0-9])(?=[A-Z])|(?<=[A-Z])(?=[A-Z][a-z])")
_STATISTIC = re.compile(r"^(n|mean|std|min|max|median|p([1-9]|[1-9][0-9]))$")


def identifier_key(column: str) -> str:
    """How column names are compared: ignoring case, spaces, '_' and '-', so that "Patient ID",
    "patient-id" and "PATIENT_ID" are one name."""
    return "".join(c for c in column.casefold() if c.isalnum())


def name_words(column: str) -> list[str]:
    """A column name's words: split at non-letters and at camelCase ("PatientsName")."""
    spaced = _CAMEL.sub(" ", column)
    return [w for w in re.split(r"[^0-9a-z]+", spaced.casefold()) if w]


def is_person_identifier(column: str, declared: Iterable[str] = ()) -> bool:
    """True for a name that identifies a person, by pattern or declared in `id_columns`."""
    key = identifier_key(column)
    if key in PERSON_KEYS or key in {identifier_key(d) for d in declared}:
        return True
    words = set(name_words(column))
    if words & {"name", "names"} and words & THING_WORDS:
        words -= {"name", "names"}
        return bool(words & PERSON_WORDS) or _has_fragment(key.replace("name", ""))
    return bool(words & PERSON_WORDS) or _has_fragment(key)


def _has_fragment(key: str) -> bool:
    return any(fragment in key for fragment in PERSON_FRAGMENTS)


def is_code(column: str) -> bool:
    """A code or key column ("ward_code", "ICD10", "visit no"): never averaged."""
    words = name_words(column)
    return bool(set(words) & CODE_WORDS) or any(w.startswith("icd") for w in words)


class EmrOptions(_Options):
    group_by: str = Field(default="diagnosis", min_length=1)
    # Which values are summarised; None means every numeric column except identifiers, codes
    # and `category_columns`.
    columns: tuple[str, ...] | None = None
    category_columns: tuple[str, ...] = ()
    # n (each column's own count, `n_<column>`), mean, std, min, max, median, p1..p99.
    # mean/std/min/max are exact across files and batches; median and quantiles within a batch.
    statistics: tuple[str, ...] = ("mean",)
    # Median and quantiles hold the values (8 bytes each): an input with more is refused.
    max_quantile_values: int = Field(default=20_000_000, gt=0)
    # "row": a row missing any value of `required_columns` (default: every column) is dropped.
    # "column": each column over its own values, with its own `n_<column>`.
    missing: Literal["row", "column"] = "row"
    required_columns: tuple[str, ...] | None = None
    # More person identifiers, beyond the built-in patterns: read as text, never averaged,
    # never published, never grouped by, never logged.
    id_columns: tuple[str, ...] = ()
    # Text exports: "auto" reads a BOM or tries UTF-8, then cp1252.
    encoding: Literal["utf-8", "cp1252", "latin-1", "auto"] = "utf-8"
    delimiter: Literal["auto", ",", ";", "\t", "|"] = "auto"
    decimal: Literal[".", ","] = "."
    sheet: str | None = None  # .xlsx: the first sheet unless named
    # .xlsx is a zip whose shared strings openpyxl holds in memory: its declared decoded size.
    max_xlsx_bytes: int = Field(default=256 << 20, gt=0)
    # .gz, .bz2, .zst, .xz text: decompressed as a stream within these caps, or refused.
    compressed: Literal["stream", "refuse"] = "stream"
    max_decoded_bytes: int = Field(default=4 << 30, gt=0)
    max_ratio: int = Field(default=200, gt=1)
    output_format: Literal["csv", "parquet"] = "csv"
    # Refused before parsing (quarantined with a reason): a header wider than max_columns, more
    # than max_rows lines, or a line longer than max_row_bytes (which also bounds one field);
    # a Parquet row group that decodes past max_row_group_bytes.
    max_columns: int = Field(default=2_000, gt=0)
    max_rows: int = Field(default=50_000_000, gt=0)
    max_row_bytes: int = Field(default=1 << 20, ge=1024, le=1 << 30)
    max_row_group_bytes: int = Field(default=256 << 20, gt=0)
    # Small-cell suppression: a group of fewer rows (or with rows from fewer than
    # min_cell_sources distinct inputs) is published with its label and values withheld and
    # `suppressed` true ("blank"), or folded into one `other` row ("merge"); a statistic over
    # fewer values is left empty. 1 turns each off.
    min_cell_size: int = Field(default=11, ge=1)
    min_cell_sources: int = Field(default=1, ge=1)
    small_cells: Literal["blank", "merge"] = "blank"

    @model_validator(mode="after")
    def _check(self) -> EmrOptions:
        if is_person_identifier(self.group_by, self.id_columns):
            raise ValueError(
                f"group_by: {self.group_by!r} is an identifier column; its values would be "
                "published"
            )
        bad = [s for s in self.statistics if not _STATISTIC.match(s)]
        if bad or not self.statistics:
            raise ValueError(f"statistics: {bad} unknown (n, mean, std, min, max, median, p1..p99)")
        for name in self.columns or ():
            if is_person_identifier(name, self.id_columns):
                raise ValueError(f"columns: {name!r} is an identifier column")
        return self

    @property
    def field_delimiter(self) -> str | None:
        return None if self.delimiter == "auto" else self.delimiter


class ImagingOptions(_Options):
    # Applied before measuring, in this order: grey, rotate (canvas grows to fit), resize.
    rotate_deg: float = Field(default=0.0, allow_inf_nan=False)
    resize: tuple[PositiveInt, PositiveInt] | None = None  # (height, width)
    grey: bool = False
    per_frame: bool = False
    # Refuse, before decoding, an image declaring more samples than this
    # (rows x columns x frames x samples per pixel). Pillow's own bomb guard (2 x 89,478,485
    # pixels, the default here) still stops PNG and JPEG files past it.
    max_pixels: int = Field(default=178_956_970, gt=0)
    # Refuse, before decoding, an image whose decoding would hold more bytes than this at its
    # peak: samples x bytes per sample (a 16-bit PNG takes twice an 8-bit one) x the copies its
    # reader keeps (Pillow 3, DICOM 2, TIFF 1). Also caps a Deflated DICOM's inflated dataset.
    max_image_bytes: int = Field(default=1 << 30, ge=1 << 20)
    # Frames (TIFF pages, DICOM frames) per file: thousands of tiny pages are a bomb too.
    max_frames: int = Field(default=1000, gt=0)
    thumbnail_px: int = Field(default=128, ge=16, le=1024)
    # Thumbnails on the published contact sheet. "auto": not for DICOM with BurnedInAnnotation
    # YES or of a modality that usually has burned-in text (US, SC, XC, OT, ES, GM), nor for
    # photographs (JPEG, colour PNG or TIFF); every other image is shown.
    contact_sheet: Literal["auto", "on", "off"] = "auto"
    # series.csv's `series_description`: DICOM SeriesDescription is free text a technologist
    # types and can hold a name, so it is left out unless a site's descriptions are protocol
    # names only ("include").
    series_description: Literal["omit", "include"] = "omit"


class GenomicsOptions(_Options):
    # A (gene, sample) pair repeated across the batch's files is resolved over them all.
    reads_files_apart: ClassVar[bool] = False
    layout: Literal["auto", "long", "wide"] = "auto"
    gene_column: str = Field(default="gene", min_length=1)
    # Long layout only: the other two columns (auto-detection looks for all three).
    sample_column: str = Field(default="sample", min_length=1)
    expression_column: str = Field(default="expression", min_length=1)
    # Compressed input (gzip, bz2, xz, zstd, lz4; found by content, never by extension) is
    # refused unless allowed; then decoded a chunk at a time, in memory, and refused past
    # max_decoded_bytes or max_compression_ratio x its size. (Plain files are bounded by the
    # service's max_file_bytes.)
    compressed: bool = False
    max_decoded_bytes: int = Field(default=256 << 20, ge=1 << 10)
    max_compression_ratio: int = Field(default=100, ge=1)
    # Refused before parsing: a header wider than max_columns, more than max_rows data lines.
    max_columns: int = Field(default=20_000, gt=1)
    max_rows: int = Field(default=20_000_000, gt=0)
    # The same (gene, sample) in two files of one batch (repeats within one file are replicates
    # and all count): "error" quarantines a file carrying a pair of an earlier file of the
    # batch; "first" keeps the pair's values from the first file (batch order) and drops the
    # later ones; "mean" makes the pair one value, the mean of all its values in the batch.
    # Each file's `duplicate_pairs` fact counts its values so dropped or folded into a mean.
    # (Named so as not to clash with the pipeline's own `duplicates`, about whole files.)
    duplicate_pairs: Literal["error", "first", "mean"] = "error"

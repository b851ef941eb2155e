"""Options of the built-in processors: light models, so the main process validates a config
without importing pandas, scikit-image or pydicom."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, PositiveInt, model_validator


class _Options(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


DEFAULT_IDENTIFIER_COLUMNS = (
    "id",
    "patient_id",
    "patientid",
    "person_id",
    "subject_id",
    "mrn",
    "medical_record_number",
    "record_id",
    "encounter_id",
    "visit_id",
    "accession_number",
    "insurance_id",
    "account_number",
    "nhs_number",
    "name",
    "patient_name",
    "first_name",
    "given_name",
    "last_name",
    "family_name",
    "surname",
    "ssn",
    "social_security_number",
    "dob",
    "birth_date",
    "birthdate",
    "date_of_birth",
    "address",
    "street",
    "zip",
    "zip_code",
    "postcode",
    "postal_code",
    "phone",
    "telephone",
    "mobile",
    "fax",
    "email",
    "e_mail",
)


def identifier_key(column: str) -> str:
    """How column names are compared with `id_columns`: ignoring case, spaces, '_' and '-', so
    that "Patient ID", "patient-id" and "PATIENT_ID" are one name."""
    return "".join(c for c in column.casefold() if c.isalnum())


class EmrOptions(_Options):
    group_by: str = Field(default="diagnosis", min_length=1)
    # Rows with a missing value in any of these columns are dropped; None means every column.
    required_columns: tuple[str, ...] | None = None
    # Identifiers: read as text, never averaged, never published, never logged (matched by
    # `identifier_key`).
    id_columns: tuple[str, ...] = DEFAULT_IDENTIFIER_COLUMNS
    output_format: Literal["csv", "parquet"] = "csv"
    # Refused before parsing (quarantined with a reason): a header wider than max_columns, more
    # than max_rows lines, or a line longer than max_row_bytes (which also bounds one field).
    max_columns: int = Field(default=2_000, gt=0)
    max_rows: int = Field(default=5_000_000, gt=0)
    max_row_bytes: int = Field(default=1 << 20, ge=1024, le=1 << 30)
    # Small-cell suppression: a group of fewer rows is published with `n` and every mean empty
    # and `suppressed` true ("blank"), or folded into one `other` row ("merge"); a mean over
    # fewer values is left empty. 1 turns it off.
    min_cell_size: int = Field(default=11, ge=1)
    small_cells: Literal["blank", "merge"] = "blank"

    @model_validator(mode="after")
    def _group_is_not_an_identifier(self) -> EmrOptions:
        ids = {identifier_key(c) for c in self.id_columns}
        if identifier_key(self.group_by) in ids:
            raise ValueError(
                f"group_by: {self.group_by!r} is an identifier column (id_columns); its values "
                "would be published"
            )
        return self


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


class GenomicsOptions(_Options):
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

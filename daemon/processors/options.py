"""Options of the built-in processors: light models, so the main process validates a config
without importing pandas, scikit-image or pydicom."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, PositiveInt


class _Options(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


DEFAULT_IDENTIFIER_COLUMNS = (
    "id",
    "patient_id",
    "patientid",
    "mrn",
    "record_id",
    "encounter_id",
    "visit_id",
    "name",
    "patient_name",
    "first_name",
    "last_name",
    "ssn",
    "dob",
    "birth_date",
    "date_of_birth",
    "address",
    "zip",
    "phone",
    "email",
)


class EmrOptions(_Options):
    group_by: str = "diagnosis"
    # Rows with a missing value in any of these columns are dropped; None means every column.
    required_columns: tuple[str, ...] | None = None
    # Identifiers: read as text, never averaged, never published (matched ignoring case).
    id_columns: tuple[str, ...] = DEFAULT_IDENTIFIER_COLUMNS
    output_format: Literal["csv", "parquet"] = "csv"


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
    thumbnail_px: int = Field(default=128, ge=16, le=1024)


class GenomicsOptions(_Options):
    layout: Literal["auto", "long", "wide"] = "auto"
    gene_column: str = Field(default="gene", min_length=1)
    # Long layout only: the other two columns (auto-detection looks for all three).
    sample_column: str = Field(default="sample", min_length=1)
    expression_column: str = Field(default="expression", min_length=1)

"""Options of the built-in processors: light models, so the main process validates a config
without importing pandas, scikit-image or pydicom."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field


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
    rotate_deg: float = 0.0
    resize: tuple[int, int] | None = None
    grey: bool = False
    per_frame: bool = False
    max_pixels: int = Field(default=178_956_970, gt=0)
    thumbnail_px: int = Field(default=128, ge=16, le=1024)


class GenomicsOptions(_Options):
    layout: Literal["auto", "long", "wide"] = "auto"
    gene_column: str = "gene"

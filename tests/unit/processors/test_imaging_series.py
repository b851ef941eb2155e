"""series.csv: one row per DICOM series of a batch (instances, frames, modality, instance range),
numbered like result.csv's `series` column; the free-text description only when allowed."""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import pandas as pd
import pytest
from PIL import Image

from daemon.processors.imaging import ImagingProcessor
from daemon.processors.options import ImagingOptions
from tests.support.dicom import ct_instance, new_uid

DESCRIPTION = "CANARY^SURNAME head w/o"


def processor(**options: Any) -> ImagingProcessor:
    return ImagingProcessor(ImagingOptions(**options))


def batch(tmp_path: Path) -> list[Path]:
    """Series 2 (three instances) and series 1 (two, modality MR), interleaved, and a PNG."""
    study = new_uid()
    first, second = new_uid(), new_uid()
    paths = []
    for i, (uid, number, instance) in enumerate(
        [(first, 2, 3), (second, 1, 1), (first, 2, 1), (second, 1, 2), (first, 2, 2)]
    ):
        extra = {"Modality": "MR"} if uid == second else {}
        data = ct_instance(uid, study, instance, SeriesNumber=number,
                           SeriesDescription=DESCRIPTION, **extra)  # fmt: skip
        paths.append(tmp_path / f"i{i}.dcm")
        paths[-1].write_bytes(data)
    png = tmp_path / "photo.png"
    Image.new("L", (8, 8)).save(png)
    return [*paths, png]


def publish(tmp_path: Path, proc: ImagingProcessor, split: int) -> tuple[pd.DataFrame, ...]:
    paths = batch(tmp_path)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        parts = [proc.read(p, p.name)[0] for p in paths]
    merged = proc.merge([proc.merge(parts[:split]), proc.merge(parts[split:])])
    out = tmp_path / f"out{split}"
    out.mkdir()
    assert proc.write(merged, out)[-1] == "series.csv"
    return pd.read_csv(out / "series.csv"), pd.read_csv(out / "result.csv")


@pytest.mark.parametrize("split", [0, 2, 5])
def test_one_row_per_series_in_clinical_order(tmp_path: Path, split: int) -> None:
    """However the batch was split, series are numbered by series number and counted right."""
    series, result = publish(tmp_path, processor(), split)
    assert series["series"].tolist() == [1, 2]
    assert series["series_number"].tolist() == [1, 2]
    assert series["modality"].tolist() == ["MR", "CT"]
    assert series["instances"].tolist() == [2, 3]
    assert series["frames"].tolist() == [2, 3]
    assert series["first_instance"].tolist() == [1, 1]
    assert series["last_instance"].tolist() == [2, 3]
    # Each image row names its series; the PNG belongs to none.
    dicom = result[result["transfer_syntax"].notna()]
    assert (dicom["series"] == dicom["series_number"]).all()
    assert result.loc[result["transfer_syntax"].isna(), "series"].isna().all()


def test_description_is_left_out_unless_allowed(tmp_path: Path) -> None:
    """Free text can hold a name: absent by default, present with series_description=include."""
    (tmp_path / "omit").mkdir()
    (tmp_path / "include").mkdir()
    series, result = publish(tmp_path / "omit", processor(), 2)
    assert series["series_description"].isna().all()
    for table in (series, result):
        assert "CANARY" not in table.to_csv()
    allowed, _ = publish(tmp_path / "include", processor(series_description="include"), 2)
    assert allowed["series_description"].tolist() == [DESCRIPTION, DESCRIPTION]


def test_per_frame_rows_count_an_image_once(tmp_path: Path) -> None:
    """per_frame gives a row per frame; series.csv still counts instances, not rows."""
    series, _ = publish(tmp_path, processor(per_frame=True), 3)
    assert series["instances"].tolist() == [2, 3]


def test_no_series_file_without_dicom(tmp_path: Path) -> None:
    proc = processor()
    png = batch(tmp_path)[-1]
    out = tmp_path / "out"
    out.mkdir()
    assert proc.write(proc.merge([proc.read(png, png.name)[0]]), out) == [
        "result.csv", "contact_sheet.png"
    ]  # fmt: skip

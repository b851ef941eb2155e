"""Imaging, clinically right (issue 14.5, 12.6): modality LUT statistics against pydicom's own,
geometry in the row, rows in series/instance order, contact-sheet policy and numbered tiles."""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
import pytest
from PIL import Image
from pydicom.data import get_testdata_file
from pydicom.pixels.processing import apply_modality_lut

from daemon.processors.imaging import ImagingProcessor
from daemon.processors.options import ImagingOptions


def processor(**options: Any) -> ImagingProcessor:
    return ImagingProcessor(ImagingOptions(**options))


def ct(tmp_path: Path, name: str, **attributes: Any) -> Path:
    """CT_small.dcm with the given attributes set."""
    source = get_testdata_file("CT_small.dcm")
    assert source is not None
    ds = pydicom.dcmread(source)
    for keyword, value in attributes.items():
        setattr(ds, keyword, value)
    path = tmp_path / name
    ds.save_as(path, enforce_file_format=True)
    return path


@pytest.mark.parametrize(("slope", "intercept"), [(1.0, -1024.0), (2.5, -100.0), (-0.5, 7.0)])
def test_modality_lut_statistics_equal_pydicoms(
    tmp_path: Path, slope: float, intercept: float
) -> None:
    """mean/std/min/max are pydicom's apply_modality_lut statistics; raw_* the stored ones."""
    path = ct(tmp_path, "ct.dcm", RescaleSlope=slope, RescaleIntercept=intercept)
    partial, _ = processor().read(path, path.name)
    row = partial.rows[0]
    ds = pydicom.dcmread(path)
    stored = ds.pixel_array.astype(np.float64)
    modality = apply_modality_lut(ds.pixel_array, ds).astype(np.float64)
    for prefix, values in (("", modality), ("raw_", stored)):
        assert row[f"{prefix}mean"] == pytest.approx(values.mean(), rel=1e-12)
        assert row[f"{prefix}std"] == pytest.approx(values.std(), rel=1e-9)
        assert row[f"{prefix}min"] == pytest.approx(values.min())
        assert row[f"{prefix}max"] == pytest.approx(values.max())
    assert (row["units"], row["rescale_slope"], row["rescale_intercept"]) == (
        "HU",
        slope,
        intercept,
    )


def test_geometry_from_the_header(tmp_path: Path) -> None:
    path = ct(tmp_path, "ct.dcm", PixelSpacing=[0.5, 0.75], SliceThickness=2.5)
    row = processor().read(path, path.name)[0].rows[0]
    assert (row["pixel_spacing_row_mm"], row["pixel_spacing_col_mm"]) == (0.5, 0.75)
    assert row["slice_thickness_mm"] == 2.5


def test_rows_follow_series_then_instance_then_name(tmp_path: Path) -> None:
    """Whatever the order read and the names, DICOM by (series, instance), then the rest by name."""
    proc = processor()
    specs = [("z.dcm", 2, 1), ("a.dcm", 2, 3), ("m.dcm", 1, 9), ("b.dcm", 2, 2)]
    paths = [ct(tmp_path, n, SeriesNumber=s, InstanceNumber=i) for n, s, i in specs]
    for name in ("b.png", "a.png"):
        Image.fromarray(np.zeros((4, 4), np.uint8)).save(tmp_path / name)
        paths.append(tmp_path / name)
    partials = [proc.read(p, p.name)[0] for p in reversed(paths)]
    merged = proc.merge(partials)
    assert [r["source"] for r in merged.rows] == ["m.dcm", "z.dcm", "b.dcm", "a.dcm", "a.png",
                                                 "b.png"]  # fmt: skip
    out = tmp_path / "out"
    out.mkdir()
    proc.write(merged, out)
    assert (out / "result.csv").read_text().splitlines()[1].split(",")[2] == "1"


def jpeg(path: Path) -> Path:
    Image.fromarray(np.zeros((8, 8), np.uint8)).save(path, format="JPEG")
    return path


def png(path: Path, shape: tuple[int, ...]) -> Path:
    Image.fromarray(np.zeros(shape, np.uint8)).save(path, format="PNG")
    return path


@pytest.mark.parametrize(
    ("make", "shown"),
    [
        (lambda d: ct(d, "ct.dcm"), "shown"),
        (lambda d: ct(d, "b.dcm", BurnedInAnnotation="YES"), "withheld_dicom_burned_in"),
        (lambda d: ct(d, "us.dcm", Modality="US"), "withheld_dicom_burned_in"),
        (lambda d: ct(d, "sc.dcm", Modality="SC"), "withheld_dicom_burned_in"),
        (lambda d: ct(d, "xc.dcm", Modality="XC"), "withheld_dicom_burned_in"),
        (lambda d: jpeg(d / "grey.jpg"), "withheld_photograph"),
        (lambda d: png(d / "rgb.png", (8, 8, 3)), "withheld_photograph"),
        (lambda d: png(d / "grey.png", (8, 8)), "shown"),
    ],
)
def test_contact_sheet_policy(tmp_path: Path, make: Any, shown: str) -> None:
    """ "auto" withholds burned-in DICOM and photographs; "on" shows all, "off" none."""
    path = make(tmp_path)
    partial, facts = processor().read(path, path.name)
    assert facts["thumbnail"] == shown
    assert len(partial.thumbnails) == (1 if shown == "shown" else 0)
    assert len(processor(contact_sheet="on").read(path, path.name)[0].thumbnails) == 1
    assert (
        processor(contact_sheet="off").read(path, path.name)[1]["thumbnail"].startswith("withheld")
    )


def test_tiles_are_numbered_like_the_rows(tmp_path: Path) -> None:
    """A withheld image leaves no tile and no number; the others are 1..n in row order, and the
    number is drawn in its tile's corner."""
    proc = processor(thumbnail_px=32)
    paths = [png(tmp_path / "a.png", (32, 32)), png(tmp_path / "b.png", (8, 8, 3)),
             png(tmp_path / "c.png", (32, 32))]  # fmt: skip
    merged = proc.merge([proc.read(p, p.name)[0] for p in paths])
    proc.write(merged, tmp_path)
    lines = (tmp_path / "result.csv").read_text().splitlines()[1:]
    assert [(line.split(",")[0], line.split(",")[2]) for line in lines] == [
        ('"a.png"', "1"), ('"b.png"', '""'), ('"c.png"', "2")]  # fmt: skip
    sheet = np.asarray(Image.open(io.BytesIO((tmp_path / "contact_sheet.png").read_bytes())))
    assert sheet.shape == (36, 70)
    assert sheet[2:14, 2:10].max() > 200  # the white digit (antialiased), over a black image

"""The imaging pipeline end to end, through the real service: real DICOM, PNG and TIFF files in,
numpy's statistics and a contact sheet out, bad files quarantined, no patient attribute anywhere."""

from __future__ import annotations

import io
import math
import re
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pydicom
import pytest
import tifffile
from numpy.typing import NDArray
from PIL import Image
from pydicom.data import get_testdata_file
from pydicom.pixels.processing import apply_modality_lut

from daemon.audit import hash_name
from tests.support.accounting import check_accounting
from tests.support.service import Service
from tests.support.waiting import wait_until
from tests.system.conftest import MakeService

THUMBNAIL_PX = 32
SHEET_PADDING_PX = 2
LIBRARY = re.compile(r"/site-packages/(skimage|PIL)/")
SNAKE_CASE = re.compile(r"^[a-z][a-z0-9]*(?:_[a-z0-9]+)*$")
# Bundled with pydicom (no download): name in the inbox → pydicom test file.
DICOM_FILES = {
    "ct.dcm": "CT_small.dcm",  # CT, explicit VR little endian, int16
    "mr.dcm": "MR_small.dcm",
    "us_rgb.dcm": "examples_rgb_color.dcm",  # ultrasound, RGB
    "dose_multiframe.dcm": "rtdose.dcm",  # RT dose, implicit VR, 15 frames
    "mr_rle.dcm": "MR_small_RLE.dcm",  # RLE lossless
    "mr_bigendian.dcm": "MR_small_bigendian.dcm",  # explicit VR big endian
}
RNG = np.random.default_rng(2024)
GENERATED: dict[str, NDArray[Any]] = {
    "grey8.png": RNG.integers(0, 256, (40, 60), dtype=np.uint8),
    "grey16.png": RNG.integers(0, 65536, (50, 30), dtype=np.uint16),
    "rgb.png": RNG.integers(0, 256, (24, 36, 3), dtype=np.uint8),
    "pages.tif": RNG.integers(0, 4096, (3, 20, 25), dtype=np.uint16),  # 3 pages
    "float.tif": RNG.normal(0.0, 1.0, (16, 16)).astype(np.float32),
}
CANARIES = {
    "PatientName": "CANARYNAME^ZEPHYRINE",
    "PatientID": "CANARYPID4711",
    "PatientBirthDate": "18870412",
    "AccessionNumber": "CANARYACC99",
    "InstitutionName": "CANARY GENERAL HOSPITAL",
}


def imaging(**overrides: object) -> dict[str, object]:
    return {
        "name": "imaging",
        "kind": "imaging",
        "max_files": 1000,
        "max_wait": 5,
        "settle_s": 0.1,
        "thumbnail_px": THUMBNAIL_PX,
        **overrides,
    }


def pydicom_file(name: str) -> Path:
    path = get_testdata_file(name, download=False)
    assert path is not None, f"{name} is not bundled with this pydicom"
    return Path(path)


def encoded(name: str, pixels: NDArray[Any]) -> bytes:
    buffer = io.BytesIO()
    if name.endswith(".tif"):
        tifffile.imwrite(buffer, pixels, photometric="minisblack")
    else:
        Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


def truncated_png() -> bytes:
    whole = encoded("x.png", RNG.integers(0, 256, (64, 64), dtype=np.uint8))
    return whole[: len(whole) // 2]


def garbage_dicom() -> bytes:
    """The DICM preamble, then bytes that are no dataset."""
    return b"\0" * 128 + b"DICM" + np.random.default_rng(9).bytes(4096)


def drop_all(service: Service, files: dict[str, bytes]) -> dict[str, str]:
    return {name: service.drop("imaging", name, data) for name, data in files.items()}


def one_manifest(service: Service) -> dict[str, Any]:
    manifests = service.manifests("imaging")
    assert len(manifests) == 1, [m["batch_id"] for m in manifests]
    return manifests[0]


def rows_of(service: Service, manifest: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """result.csv, row by source name (published hashed: mapped back, failing on a real name)."""
    folder = service.outbox / "imaging" / manifest["batch_id"]
    table = pd.read_csv(folder / "result.csv", dtype={"source": str})
    assert table["source"].is_unique
    records = [{str(k): v for k, v in row.items()} for row in table.to_dict("records")]
    return {service.real_name(str(row["source"])): row for row in records}


def assert_stats(
    row: dict[str, Any], pixels: NDArray[Any], modality: NDArray[Any] | None = None
) -> None:
    """`raw_*` are numpy's statistics of the stored pixels; the plain ones of `modality` (the
    modality LUT applied, Hounsfield units for CT), the stored pixels when there is none."""
    for prefix, array in (("raw_", pixels), ("", pixels if modality is None else modality)):
        values = array.astype(np.float64)
        assert row[f"{prefix}mean"] == pytest.approx(values.mean(), rel=1e-9)
        assert row[f"{prefix}std"] == pytest.approx(values.std(), rel=1e-9, abs=1e-12)
        assert row[f"{prefix}min"] == pytest.approx(values.min(), rel=1e-12)
        assert row[f"{prefix}max"] == pytest.approx(values.max(), rel=1e-12)


def optional(value: Any) -> Any:
    return None if value is None or (isinstance(value, float) and math.isnan(value)) else value


def assert_geometry(row: dict[str, Any], ds: pydicom.Dataset) -> None:
    """Pixel spacing, slice thickness, series and instance number as pydicom reads them."""
    spacing = ds.get("PixelSpacing")
    want_spacing = (None, None) if spacing is None else (float(spacing[0]), float(spacing[1]))
    got = (optional(row["pixel_spacing_row_mm"]), optional(row["pixel_spacing_col_mm"]))
    assert got == want_spacing
    thickness = ds.get("SliceThickness")
    assert optional(row["slice_thickness_mm"]) == (
        None if thickness in (None, "") else float(thickness)
    )
    for column, keyword in (
        ("series_number", "SeriesNumber"),
        ("instance_number", "InstanceNumber"),
    ):
        value = ds.get(keyword)
        assert optional(row[column]) == (None if value in (None, "") else int(value))


def image_libraries_in(service: Service) -> list[str]:
    """Native modules of scikit-image or Pillow mapped into the service's main process (they
    belong in the workers only)."""
    assert service.process is not None
    maps = Path(f"/proc/{service.process.pid}/maps").read_text()
    return sorted({line.split()[-1] for line in maps.splitlines() if re.search(LIBRARY, line)})


def expected_sheet_size(n_images: int) -> tuple[int, int]:
    """Tiles of THUMBNAIL_PX a side (the largest thumbnail) in a near-square grid."""
    n_cols = math.ceil(math.sqrt(n_images))
    n_rows = math.ceil(n_images / n_cols)
    tile = THUMBNAIL_PX + SHEET_PADDING_PX
    return n_cols * tile + SHEET_PADDING_PX, n_rows * tile + SHEET_PADDING_PX


def test_real_images_publish_numpy_statistics_and_a_contact_sheet(
    make_service: MakeService,
) -> None:
    """Real DICOM files and generated PNG/TIFF images come out as one row each, with their
    shapes and numpy's statistics, and a contact sheet of the expected size; a garbage DICOM
    and a truncated PNG are quarantined with a reason while the rest of their batch publishes."""
    # Given one batch's worth of good images and two bad files
    files = {name: pydicom_file(source).read_bytes() for name, source in DICOM_FILES.items()}
    files |= {name: encoded(name, pixels) for name, pixels in GENERATED.items()}
    files |= {"broken.dcm": garbage_dicom(), "cut.png": truncated_png()}
    service = make_service([imaging(max_files=len(files))])
    service.start()

    # When they are dropped
    dropped = drop_all(service, files)
    wait_until(lambda: service.accounted() == len(files), 45, message="all accounted")
    assert not image_libraries_in(service), "image libraries loaded in the main process"
    assert service.stop() == 0

    # Then one batch holds every good image, and the two bad ones are quarantined from it
    manifest = one_manifest(service)
    good = sorted(set(files) - {"broken.dcm", "cut.png"})
    assert sorted(i["name"] for i in manifest["inputs"]) == good
    assert sorted(q["name"] for q in manifest["quarantined"]) == ["broken.dcm", "cut.png"]
    sidecars = {q["name"]: q for q in service.quarantined("imaging")}
    assert sorted(sidecars) == ["broken.dcm", "cut.png"]
    for name, sidecar in sidecars.items():
        assert sidecar["reason"] == "unreadable_image", sidecar
        assert SNAKE_CASE.match(sidecar["reason"])
        assert sidecar["detail"]
        assert (sidecar["sha256"], sidecar["batch_id"]) == (dropped[name], manifest["batch_id"])

    # Each image is one row with its shape and numpy's statistics on the same pixels
    rows = rows_of(service, manifest)
    assert sorted(rows) == good
    for name, source in DICOM_FILES.items():
        ds = pydicom.dcmread(pydicom_file(source))
        pixels = ds.pixel_array
        frames = int(ds.get("NumberOfFrames") or 1)
        row = rows[name]
        assert_stats(row, pixels, apply_modality_lut(pixels, ds))
        assert_geometry(row, ds)
        assert (row["height"], row["width"]) == (ds.Rows, ds.Columns)
        assert (row["frames"], row["channels"]) == (frames, ds.SamplesPerPixel)
        assert row["dtype"] == pixels.dtype.name
        assert row["sha256"] == dropped[name]
        assert row["modality"] == ds.Modality
        assert row["transfer_syntax"] == str(ds.file_meta.TransferSyntaxUID)
        assert (row["rows"], row["columns"], row["bits_stored"]) == (
            ds.Rows,
            ds.Columns,
            ds.BitsStored,
        )
        assert row["photometric"] == ds.PhotometricInterpretation
    for name, pixels in GENERATED.items():
        row = rows[name]
        assert_stats(row, pixels)
        frames = pixels.shape[0] if name == "pages.tif" else 1
        height, width = pixels.shape[-2:] if name == "pages.tif" else pixels.shape[:2]
        assert (row["height"], row["width"], row["frames"]) == (height, width, frames)
        assert row["channels"] == (3 if pixels.ndim == 3 and name != "pages.tif" else 1)
        assert row["dtype"] == pixels.dtype.name
        assert pd.isna(row["modality"])
    for variant in ("mr_rle.dcm", "mr_bigendian.dcm"):  # the same pixels, encoded otherwise
        assert (rows[variant]["mean"], rows[variant]["std"]) == (
            rows["mr.dcm"]["mean"],
            rows["mr.dcm"]["std"],
        )

    # Rows in clinical order: DICOM by series then instance number, then the rest by published
    # (hashed) name: the worker never sees the real ones
    order = list(rows)
    dicom_rows = [rows[n] for n in order if isinstance(rows[n]["transfer_syntax"], str)]
    keys = [(optional(r["series_number"]) or 2**31, optional(r["instance_number"]) or 2**31)
            for r in dicom_rows]  # fmt: skip
    assert keys == sorted(keys)
    key = (service.root / "state" / "audit-name.key").read_bytes()
    assert order[len(dicom_rows) :] == sorted(GENERATED, key=lambda n: hash_name(key, n))
    # Thumbnails ("auto"): none for the ultrasound (burned-in text) nor the colour photograph;
    # the others numbered 1..n in row order, the number in the row's `tile`
    withheld = {"us_rgb.dcm", "rgb.png"}
    shown = [n for n in order if n not in withheld]
    assert [int(rows[n]["tile"]) for n in shown] == list(range(1, len(shown) + 1))
    assert all(pd.isna(rows[n]["tile"]) for n in withheld)
    facts = {i["name"]: i for i in manifest["inputs"]}
    assert facts["us_rgb.dcm"]["thumbnail"] == "withheld_dicom_burned_in"
    assert facts["rgb.png"]["thumbnail"] == "withheld_photograph"

    # And the contact sheet opens as a PNG of the expected size
    sheet_path = service.outbox / "imaging" / manifest["batch_id"] / "contact_sheet.png"
    with Image.open(sheet_path) as sheet:
        assert sheet.format == "PNG"
        assert sheet.size == expected_sheet_size(len(shown))
        assert sheet.mode == "L"  # the colour images are not on it
        sheet.load()
    assert sorted(o["name"] for o in manifest["outputs"]) == [
        "contact_sheet.png", "result.csv", "series.csv"
    ]  # fmt: skip
    check_accounting(service, dropped)


def canary_dicom(folder: Path) -> bytes:
    ds = pydicom.dcmread(pydicom_file("CT_small.dcm"))
    for keyword, value in CANARIES.items():
        setattr(ds, keyword, value)
    path = folder / "canary.dcm"
    ds.save_as(path)
    return path.read_bytes()


def invalid_canary_dicom(folder: Path) -> bytes:
    """A second patient, whose birth date is not even a date (archives hold such values)."""
    ds = pydicom.dcmread(pydicom_file("MR_small.dcm"))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ds.PatientBirthDate = "CANARYDOB-BAD"
        ds.PatientName = "CANARYSECOND^PATIENT"
    path = folder / "canary2.dcm"
    ds.save_as(path)
    return path.read_bytes()


def canary_tokens() -> list[str]:
    tokens = {"CANARYDOB-BAD", "CANARYSECOND", "1887-04-12"}
    for value in CANARIES.values():
        tokens.add(value)
        tokens.update(part for part in re.split(r"[\^ ]", value) if len(part) >= 6)
    return sorted(tokens)


def test_no_patient_attribute_is_published_audited_or_logged(
    make_service: MakeService, tmp_path: Path
) -> None:
    """Canary patient attributes in DICOM files appear in no published file, no audit line,
    nowhere in the service's stderr (and not in the journal)."""
    sources = tmp_path / "sources"  # outside the service's folders
    sources.mkdir()
    files = {"scan_a.dcm": canary_dicom(sources), "scan_b.dcm": invalid_canary_dicom(sources)}
    assert all(b"CANARYNAME" in data or b"CANARYSECOND" in data for data in files.values())
    service = make_service([imaging(max_files=len(files))])
    service.start()

    dropped = drop_all(service, files)
    wait_until(lambda: service.accounted() == len(files), 30, message="all accounted")
    assert service.stop() == 0

    manifest = one_manifest(service)
    assert sorted(i["name"] for i in manifest["inputs"]) == sorted(files)
    published = [p for p in (service.outbox / "imaging").rglob("*") if p.is_file()]
    assert {p.name for p in published} >= {"result.csv", "contact_sheet.png", "manifest.json"}
    audit_files = sorted((service.outbox / "_audit").glob("*.jsonl"))
    assert audit_files and service.audit()
    # The journal is not published, but `medbatch trace` and `status` print from it.
    journal_files = sorted((service.root / "state").glob("journal.db*"))
    stderr = service.stderr()
    assert stderr
    for token in canary_tokens():
        needle = token.encode()
        searched = published + audit_files + journal_files
        found = [str(p) for p in searched if needle in p.read_bytes()]
        assert not found, f"{token!r} in {found}"
        assert token not in stderr, f"{token!r} in the service's stderr"
    check_accounting(service, dropped)

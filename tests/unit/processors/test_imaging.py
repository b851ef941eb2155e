"""Imaging processor: statistics of real DICOM, PNG, TIFF and JPEG files equal numpy's on the same
pixels; bad files quarantine with a reason; no patient attribute reaches the result."""

from __future__ import annotations

import hashlib
import pickle
import shutil
import struct
import zlib
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
import pytest
import tifffile
from numpy.typing import NDArray
from PIL import Image
from pydicom.data import get_testdata_file
from pydicom.pixels.decoders.base import get_decoder
from pydicom.pixels.processing import apply_color_lut, apply_modality_lut
from pydicom.uid import UID, JPEGBaseline8Bit, JPEGExtended12Bit, JPEGLSLossless
from skimage.color import rgb2gray
from skimage.io import imsave
from skimage.transform import resize, rotate

from daemon.errors import ProcessorError
from daemon.processors.imaging import ImagingPartial, ImagingProcessor
from daemon.processors.options import ImagingOptions

RNG = np.random.default_rng(7)
CANARIES = {
    "PatientName": "CANARYNAME^ZEPHYRINE",
    "PatientID": "CANARYID-4711",
    "PatientBirthDate": "19010203",
    "AccessionNumber": "CANARYACC99",
    "InstitutionName": "CANARY GENERAL HOSPITAL",
    "StudyDate": "19990909",
}


def processor(**options: Any) -> ImagingProcessor:
    return ImagingProcessor(ImagingOptions(**options))


def dicom(tmp_path: Path, name: str) -> Path:
    """A copy of one of pydicom's bundled test files, as the spool would hold it."""
    source = get_testdata_file(name)
    assert source is not None
    return Path(shutil.copyfile(source, tmp_path / name))


def dicom_pixels(path: Path) -> NDArray[Any]:
    ds = pydicom.dcmread(path)
    pixels: NDArray[Any] = ds.pixel_array
    if ds.PhotometricInterpretation == "PALETTE COLOR":
        pixels = apply_color_lut(pixels, ds)
    return pixels


def assert_stats(
    row: dict[str, Any], pixels: NDArray[Any], modality: NDArray[Any] | None = None
) -> None:
    """`raw_*` are numpy's statistics of the stored pixels; the plain ones of `modality` (the
    modality LUT applied), which is the stored pixels when there is no LUT."""
    for prefix, values in (("raw_", pixels), ("", pixels if modality is None else modality)):
        expected = values.astype(np.float64)
        assert row[f"{prefix}mean"] == pytest.approx(expected.mean(), rel=1e-9, abs=1e-9)
        assert row[f"{prefix}std"] == pytest.approx(expected.std(), rel=1e-9, abs=1e-9)
        assert row[f"{prefix}min"] == pytest.approx(expected.min(), rel=1e-12)
        assert row[f"{prefix}max"] == pytest.approx(expected.max(), rel=1e-12)


def read_one(proc: ImagingProcessor, path: Path) -> tuple[dict[str, Any], ImagingPartial]:
    partial, facts = proc.read(path, path.name)
    assert facts["images"] == len(partial.rows) == 1
    return dict(partial.rows[0]), partial


def reason_of(proc: ImagingProcessor, path: Path) -> ProcessorError:
    with pytest.raises(ProcessorError) as info:
        proc.read(path, path.name)
    return info.value


def png_chunk(kind: bytes, data: bytes) -> bytes:
    crc = zlib.crc32(kind + data) & 0xFFFFFFFF
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", crc)


def png_header_only(path: Path, width: int, height: int) -> Path:
    """A PNG whose IHDR declares a size (8-bit grey) and that has no pixel data at all."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", ihdr) + png_chunk(b"IEND", b""))
    return path


# -- DICOM -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "shape", "frames"),
    [
        ("CT_small.dcm", (128, 128), 1),  # explicit VR little endian
        ("MR_small.dcm", (64, 64), 1),
        ("MR_small_RLE.dcm", (64, 64), 1),  # RLE Lossless, decoded by pydicom alone
        ("MR_small_bigendian.dcm", (64, 64), 1),
        ("image_dfl.dcm", (512, 512), 1),  # deflated
        ("rtdose.dcm", (10, 10), 15),  # implicit VR, multi-frame
        ("SC_rgb_small_odd.dcm", (3, 3, 3), 1),  # RGB
        ("SC_rgb_rle_2frame.dcm", (100, 100, 3), 2),  # RGB, RLE, multi-frame
        ("examples_palette.dcm", (350, 800, 3), 1),  # palette colour, LUT applied
    ],
)
def test_dicom_stats_equal_numpy(
    tmp_path: Path, name: str, shape: tuple[int, ...], frames: int
) -> None:
    """Each supported DICOM encoding gives numpy's statistics of its stored pixels (`raw_*`) and
    of pydicom's modality LUT applied to them."""
    path = dicom(tmp_path, name)
    row, partial = read_one(processor(contact_sheet="on"), path)
    pixels = dicom_pixels(path)
    assert_stats(row, pixels, apply_modality_lut(pixels, pydicom.dcmread(path)))
    assert (row["height"], row["width"]) == shape[:2]
    assert row["channels"] == (shape[2] if len(shape) == 3 else 1)
    assert row["frames"] == frames
    assert row["frame"] is None
    assert row["dtype"] == pixels.dtype.name
    assert row["transfer_syntax"] == str(pydicom.dcmread(path).file_meta.TransferSyntaxUID)
    assert row["sha256"] == hashlib.sha256(path.read_bytes()).hexdigest()
    thumbnail = partial.thumbnails[0].pixels
    assert thumbnail.dtype == np.uint8
    assert max(thumbnail.shape[:2]) <= 128


@pytest.mark.parametrize("variant", ["MR_small_RLE.dcm", "MR_small_bigendian.dcm"])
def test_dicom_encodings_measure_the_same_pixels(tmp_path: Path, variant: str) -> None:
    """RLE and big-endian copies of MR_small measure exactly as the plain file does."""
    plain, _ = read_one(processor(), dicom(tmp_path, "MR_small.dcm"))
    other, _ = read_one(processor(), dicom(tmp_path, variant))
    for key in ("mean", "std", "min", "max", "width", "height", "dtype", "rows", "columns"):
        assert other[key] == plain[key]


def test_dicom_safe_tags(tmp_path: Path) -> None:
    """Modality and a few technical tags are reported."""
    row, _ = read_one(processor(), dicom(tmp_path, "CT_small.dcm"))
    assert (row["modality"], row["rows"], row["columns"]) == ("CT", 128, 128)
    assert (row["bits_stored"], row["photometric"]) == (16, "MONOCHROME2")


def test_dicom_per_frame(tmp_path: Path) -> None:
    """With per_frame, a multi-frame DICOM gives one row per frame, each numpy's."""
    path = dicom(tmp_path, "rtdose.dcm")
    partial, facts = processor(per_frame=True).read(path, path.name)
    pixels = dicom_pixels(path)
    assert facts == {"images": 15, "frames": 15, "thumbnail": "shown"}
    assert [row["frame"] for row in partial.rows] == list(range(15))
    for row, frame in zip(partial.rows, pixels, strict=True):
        assert_stats(dict(row), frame)


def test_dicom_jpeg_baseline_with_a_handler(tmp_path: Path) -> None:
    """A JPEG-compressed DICOM decodes through Pillow (installed with scikit-image)."""
    assert get_decoder(JPEGBaseline8Bit).is_available, "Pillow should decode JPEG baseline"
    path = dicom(tmp_path, "SC_rgb_jpeg_dcmtk.dcm")
    row, _ = read_one(processor(), path)
    assert (row["height"], row["width"], row["channels"]) == (100, 100, 3)
    assert_stats(row, dicom_pixels(path))


@pytest.mark.parametrize(
    ("name", "syntax", "plugins"),
    [
        ("MR_small_jpeg_ls_lossless.dcm", JPEGLSLossless, ()),
        ("JPEG-lossy.dcm", JPEGExtended12Bit, ("pillow",)),  # 12-bit: beyond Pillow
    ],
)
def test_dicom_without_a_handler_is_unsupported(
    tmp_path: Path, name: str, syntax: UID, plugins: tuple[str, ...]
) -> None:
    """A compressed transfer syntax without a capable decoder quarantines, naming the syntax.

    The project installs no pylibjpeg/GDCM plug-in: `plugins` is what it does install."""
    assert get_decoder(syntax).available_plugins == plugins
    error = reason_of(processor(), dicom(tmp_path, name))
    assert error.reason == "unsupported_transfer_syntax"
    assert syntax.name in error.detail


def test_library_warnings_are_counted_not_raised(tmp_path: Path) -> None:
    """pydicom's warnings about a file's data are counted in the facts, not raised."""
    assert get_decoder(JPEGBaseline8Bit).is_available, "Pillow should decode JPEG baseline"
    path = dicom(tmp_path, "SC_rgb_jpeg.dcm")
    _, facts = processor().read(path, path.name)
    assert facts["images"] == 1
    assert int(facts["warnings"]) >= 1


def test_dicom_without_pixel_data(tmp_path: Path) -> None:
    """A DICOM dataset without pixel data is no_image."""
    ds = pydicom.dcmread(dicom(tmp_path, "CT_small.dcm"))
    del ds.PixelData
    ds.save_as(tmp_path / "nopixels.dcm")
    assert reason_of(processor(), tmp_path / "nopixels.dcm").reason == "no_image"


def test_dicom_without_preamble_is_not_forced_open(tmp_path: Path) -> None:
    """A .dcm without the DICM marker at byte 128 is not_dicom."""
    data = bytearray(dicom(tmp_path, "CT_small.dcm").read_bytes())
    data[128:132] = b"XXXX"
    (tmp_path / "bad.dcm").write_bytes(data)
    assert reason_of(processor(), tmp_path / "bad.dcm").reason == "not_dicom"


def test_dicom_pixel_guard(tmp_path: Path) -> None:
    """Rows x Columns x frames x samples over max_pixels is refused before decoding."""
    error = reason_of(processor(max_pixels=1000), dicom(tmp_path, "CT_small.dcm"))
    assert error.reason == "too_many_pixels"


def test_truncated_dicom_is_unreadable(tmp_path: Path) -> None:
    """Pixel data shorter than the header declares is unreadable_image."""
    error = reason_of(processor(), dicom(tmp_path, "MR_truncated.dcm"))
    assert error.reason == "unreadable_image"


def test_no_patient_attribute_reaches_the_result(tmp_path: Path) -> None:
    """Canary patient attributes in a DICOM appear nowhere in result.csv or the facts."""
    ds = pydicom.dcmread(dicom(tmp_path, "CT_small.dcm"))
    for keyword, value in CANARIES.items():
        setattr(ds, keyword, value)
    ds.save_as(tmp_path / "canary.dcm")
    proc = processor()
    partial, facts = proc.read(tmp_path / "canary.dcm", "scan.dcm")
    out = tmp_path / "out"
    out.mkdir()
    proc.write(proc.merge([partial]), out)
    published = (out / "result.csv").read_text() + repr(facts)
    for value in CANARIES.values():
        assert value not in published
        assert value.split("^")[0] not in published


# -- PNG, TIFF, JPEG ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "pixels",
    [
        RNG.integers(0, 256, (20, 30), dtype=np.uint8),
        RNG.integers(0, 65536, (20, 30), dtype=np.uint16),
        RNG.integers(0, 256, (20, 30, 3), dtype=np.uint8),
    ],
    ids=["grey8", "grey16", "rgb"],
)
def test_png_stats_equal_numpy(tmp_path: Path, pixels: NDArray[Any]) -> None:
    """A PNG's statistics and shape are numpy's on the same pixels."""
    imsave(tmp_path / "x.png", pixels, check_contrast=False)
    row, _ = read_one(processor(), tmp_path / "x.png")
    assert_stats(row, pixels)
    assert (row["height"], row["width"], row["frames"]) == (20, 30, 1)
    assert row["channels"] == (3 if pixels.ndim == 3 else 1)
    assert row["dtype"] == pixels.dtype.name
    assert row["modality"] is None


def test_multipage_tiff_is_frames(tmp_path: Path) -> None:
    """A multi-page TIFF is one image of several frames, or one row per frame."""
    pages = RNG.integers(0, 4096, (3, 16, 24), dtype=np.uint16)
    tifffile.imwrite(tmp_path / "x.tif", pages, photometric="minisblack")
    row, _ = read_one(processor(), tmp_path / "x.tif")
    assert_stats(row, pages)
    assert (row["frames"], row["height"], row["width"]) == (3, 16, 24)
    partial, _ = processor(per_frame=True).read(tmp_path / "x.tif", "x.tif")
    for frame_row, page in zip(partial.rows, pages, strict=True):
        assert_stats(dict(frame_row), page)


def test_lzw_tiff_without_imagecodecs(tmp_path: Path) -> None:
    """An LZW TIFF decodes (through Pillow when tifffile lacks the codec)."""
    pixels = RNG.integers(0, 256, (2, 12, 10), dtype=np.uint8)
    frames = [Image.fromarray(page) for page in pixels]
    frames[0].save(
        tmp_path / "x.tif", compression="tiff_lzw", save_all=True, append_images=frames[1:]
    )
    row, _ = read_one(processor(), tmp_path / "x.tif")
    assert_stats(row, pixels)
    assert row["frames"] == 2


def test_jpeg_stats_equal_numpy(tmp_path: Path) -> None:
    """A JPEG's statistics are numpy's on its decoded pixels."""
    Image.fromarray(RNG.integers(0, 256, (24, 32, 3), dtype=np.uint8)).save(tmp_path / "x.jpg")
    with Image.open(tmp_path / "x.jpg") as image:
        decoded = np.asarray(image)
    row, _ = read_one(processor(), tmp_path / "x.jpg")
    assert_stats(row, decoded)


def test_truncated_png_is_unreadable(tmp_path: Path) -> None:
    """A PNG cut short is unreadable_image."""
    imsave(tmp_path / "x.png", RNG.integers(0, 256, (64, 64), dtype=np.uint8))
    data = (tmp_path / "x.png").read_bytes()
    (tmp_path / "cut.png").write_bytes(data[: len(data) // 2])
    assert reason_of(processor(), tmp_path / "cut.png").reason == "unreadable_image"


@pytest.mark.parametrize(("side", "max_pixels"), [(100_000, 178_956_970), (2000, 1_000_000)])
def test_png_pixel_guard_reads_only_the_header(tmp_path: Path, side: int, max_pixels: int) -> None:
    """A PNG declaring too many pixels is refused from its header (it has no pixel data)."""
    path = png_header_only(tmp_path / "bomb.png", side, side)
    assert reason_of(processor(max_pixels=max_pixels), path).reason == "too_many_pixels"


def test_unknown_and_empty_files(tmp_path: Path) -> None:
    """A file of no known format, and an empty one, are quarantined with their reason."""
    (tmp_path / "notes.txt").write_text("not an image\n")
    (tmp_path / "empty.png").write_bytes(b"")
    assert reason_of(processor(), tmp_path / "notes.txt").reason == "unsupported_format"
    assert reason_of(processor(), tmp_path / "empty.png").reason == "empty"


# -- transforms --------------------------------------------------------------------------------


def test_transforms_apply_before_measuring(tmp_path: Path) -> None:
    """grey, rotate and resize are applied, in that order, before the statistics."""
    pixels = RNG.integers(0, 256, (20, 30, 3), dtype=np.uint8)
    imsave(tmp_path / "x.png", pixels, check_contrast=False)
    row, _ = read_one(processor(grey=True, rotate_deg=90, resize=(12, 8)), tmp_path / "x.png")
    expected = rgb2gray(pixels.astype(np.float64))
    expected = rotate(expected, 90, resize=True, preserve_range=True)
    expected = resize(expected, (12, 8), preserve_range=True)
    assert (row["height"], row["width"], row["channels"]) == (12, 8, 1)
    assert_stats(row, expected)
    assert row["dtype"] == "uint8"  # what was stored


def test_rotation_grows_the_canvas(tmp_path: Path) -> None:
    """A rotation keeps the whole image (resize=True): 90 degrees swaps width and height."""
    imsave(tmp_path / "x.png", RNG.integers(0, 256, (20, 30), dtype=np.uint8))
    row, _ = read_one(processor(rotate_deg=90), tmp_path / "x.png")
    assert (row["height"], row["width"]) == (30, 20)


# -- merge and write ---------------------------------------------------------------------------


def three_partials(tmp_path: Path) -> tuple[ImagingProcessor, list[ImagingPartial]]:
    proc = processor(thumbnail_px=32, contact_sheet="on")
    imsave(tmp_path / "grey.png", RNG.integers(0, 256, (20, 30), dtype=np.uint8))
    imsave(tmp_path / "rgb.png", RNG.integers(0, 256, (64, 48, 3), dtype=np.uint8))
    paths = [tmp_path / "grey.png", tmp_path / "rgb.png", dicom(tmp_path, "MR_small.dcm")]
    return proc, [proc.read(path, path.name)[0] for path in paths]


def test_merge_is_associative_and_ordered(tmp_path: Path) -> None:
    """However the partials are grouped or ordered, the merged rows are the same."""
    proc, (a, b, c) = three_partials(tmp_path)
    at_once = proc.merge([a, b, c])
    for other in (proc.merge([proc.merge([a, b]), c]), proc.merge([c, proc.merge([b, a])])):
        assert other.rows == at_once.rows
        assert [t.key for t in other.thumbnails] == [t.key for t in at_once.thumbnails]
    # DICOM first (by series and instance number), then the other images by name.
    assert [row["source"] for row in at_once.rows] == ["MR_small.dcm", "grey.png", "rgb.png"]
    assert proc.merge([]) == ImagingPartial()
    copy = pickle.loads(pickle.dumps(a))
    assert copy.rows == a.rows
    assert np.array_equal(copy.thumbnails[0].pixels, a.thumbnails[0].pixels)


def test_write_result_and_contact_sheet(tmp_path: Path) -> None:
    """result.csv has a row per image; the contact sheet is a PNG of the expected size."""
    proc, partials = three_partials(tmp_path)
    out = tmp_path / "out"
    out.mkdir()
    # The DICOM image adds series.csv (one row per series).
    written = proc.write(proc.merge(partials), out)
    assert written == ["result.csv", "contact_sheet.png", "series.csv"]
    lines = (out / "result.csv").read_text().splitlines()
    assert lines[0].startswith(
        '"source","sha256","tile","frame","width","height","frames","channels","dtype","mean"'
    )
    assert len(lines) == 4
    # Thumbnails: 20x30 stays (no upscaling), 64x48 becomes 32x24, 64x64 becomes 32x32. Tiles
    # of 32x32 in a 2x2 grid with 2 px padding.
    side = 2 * (32 + 2) + 2
    with Image.open(out / "contact_sheet.png") as sheet:
        assert (sheet.format, sheet.size, sheet.mode) == ("PNG", (side, side), "RGB")


def test_write_without_images(tmp_path: Path) -> None:
    """With no image, result.csv has its header only and there is no contact sheet."""
    proc = processor()
    assert proc.write(proc.merge([]), tmp_path) == ["result.csv"]
    assert (tmp_path / "result.csv").read_text().count("\n") == 1
    assert not (tmp_path / "contact_sheet.png").exists()


def test_text_cells_are_neutralised_numbers_are_not(tmp_path: Path) -> None:
    """A source name starting with '=' gets a leading quote; a negative minimum stays a number."""
    pixels = np.linspace(-1.5, 2.5, 64, dtype=np.float32).reshape(8, 8)
    tifffile.imwrite(tmp_path / "x.tif", pixels)
    proc = processor()
    partial, _ = proc.read(tmp_path / "x.tif", "=HYPERLINK(1).tif")
    proc.write(proc.merge([partial]), tmp_path)
    line = (tmp_path / "result.csv").read_text().splitlines()[1]
    assert line.startswith('"\'=HYPERLINK(1).tif",')
    assert ",-1.5,2.5," in line
    assert partial.rows[0]["std"] == pytest.approx(float(pixels.std()))

"""Image format readers (DICOM, PNG, JPEG, TIFF): sniff by content, guard the pixel count from
the header, decode to stored values. Runs in worker processes, for the imaging processor.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import tifffile
from numpy.typing import NDArray
from PIL import Image
from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.pixels.decoders.base import get_decoder
from pydicom.pixels.processing import apply_color_lut
from pydicom.uid import UID, JPEGExtended12Bit

from daemon.processors.base import ProcessorError

__all__ = ["Decoded", "Tags", "read_image"]

Tags = dict[str, str | int | float | None]

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
JPEG_MAGIC = b"\xff\xd8\xff"
TIFF_MAGICS = (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+")
PIXEL_KEYWORDS = ("PixelData", "FloatPixelData", "DoubleFloatPixelData")


@dataclass(frozen=True, slots=True)
class Decoded:
    frames: list[NDArray[Any]]  # stored values, each (h, w) or (h, w, samples)
    tags: Tags  # the safe DICOM tags; never a patient attribute


@contextmanager
def _decoding(path: Path, what: str) -> Iterator[None]:
    """Turn a library failure into a quarantine reason.

    Library messages can quote data (a tag value, a file name), so only the exception's type is
    kept, and the chain is cut so that no traceback carries them into the logs either.
    """
    try:
        yield
    except (ProcessorError, MemoryError):
        raise
    except Image.DecompressionBombError:
        raise ProcessorError(
            path, "too_many_pixels", "over Pillow's decompression-bomb limit"
        ) from None
    except Exception as exc:
        raise ProcessorError(path, "unreadable_image", f"{what} ({type(exc).__name__})") from None


def _sniff(path: Path) -> str:
    """The format by content; the extension only decides that a `.dcm` is not forced open."""
    with path.open("rb") as fh:
        head = fh.read(132)
    if not head:
        raise ProcessorError(path, "empty", "the file has no bytes")
    if head[128:132] == b"DICM":
        return "dicom"
    if path.suffix.lower() in (".dcm", ".dicom"):
        raise ProcessorError(path, "not_dicom", "no DICM preamble at byte 128")
    if head.startswith((PNG_MAGIC, JPEG_MAGIC)):
        return "pillow"
    if head[:4] in TIFF_MAGICS:
        return "tiff"
    raise ProcessorError(path, "unsupported_format", "not DICOM, PNG, TIFF or JPEG by content")


def _check_pixels(path: Path, n_samples: int, max_pixels: int) -> None:
    if n_samples > max_pixels:
        raise ProcessorError(
            path, "too_many_pixels", f"{n_samples} samples declared, limit {max_pixels}"
        )


# -- DICOM -------------------------------------------------------------------------------------


def _int_tag(path: Path, ds: Dataset, keyword: str, default: int) -> int:
    value = ds.get(keyword)
    if value is None or value == "":
        return default
    try:
        number = int(value)
    except (TypeError, ValueError):
        raise ProcessorError(path, "unreadable_image", f"{keyword} is not an integer") from None
    if number < 0:
        raise ProcessorError(path, "unreadable_image", f"{keyword} is negative")
    return number


def _check_decoder(path: Path, syntax: UID, bits_stored: int) -> None:
    try:
        decoder = get_decoder(syntax)
    except NotImplementedError:
        raise ProcessorError(
            path, "unsupported_transfer_syntax", f"no pixel decoder for {syntax.name}"
        ) from None
    if not decoder.is_available:
        raise ProcessorError(
            path, "unsupported_transfer_syntax", f"{syntax.name}: no decoder plugin installed"
        )
    # pydicom's Pillow plugin, often the only one present, refuses 12-bit JPEG Extended; that is
    # a missing plugin (pylibjpeg, gdcm), not a broken file.
    if syntax == JPEGExtended12Bit and bits_stored > 8 and decoder.available_plugins == ("pillow",):
        raise ProcessorError(
            path, "unsupported_transfer_syntax", f"{syntax.name}, 12-bit: needs pylibjpeg or gdcm"
        )


def _check_frames(path: Path, n_frames: int, max_frames: int) -> None:
    if n_frames > max_frames:
        raise ProcessorError(path, "too_many_frames", f"more than max_frames ({max_frames})")


def _read_dicom(path: Path, max_pixels: int, max_frames: int) -> Decoded:
    # The header alone first: the pixel guard must run before any pixel byte is read or decoded.
    with _decoding(path, "the DICOM header could not be parsed"):
        header = dcmread(path, stop_before_pixels=True)
    syntax = header.file_meta.get("TransferSyntaxUID")
    if not isinstance(syntax, UID):
        raise ProcessorError(path, "unreadable_image", "no transfer syntax in the file meta")
    rows = _int_tag(path, header, "Rows", 0)
    columns = _int_tag(path, header, "Columns", 0)
    if not rows or not columns:
        raise ProcessorError(path, "no_image", "no Rows and Columns")
    n_frames = _int_tag(path, header, "NumberOfFrames", 1) or 1
    samples = _int_tag(path, header, "SamplesPerPixel", 1) or 1
    bits_stored = _int_tag(path, header, "BitsStored", 0)
    _check_frames(path, n_frames, max_frames)
    _check_pixels(path, rows * columns * n_frames * samples, max_pixels)
    _check_decoder(path, syntax, bits_stored)
    with _decoding(path, "the DICOM dataset could not be parsed"):
        ds = dcmread(path, stop_before_pixels=False)
    if not any(keyword in ds for keyword in PIXEL_KEYWORDS):
        raise ProcessorError(path, "no_image", "no pixel data")
    photometric = str(header.get("PhotometricInterpretation", ""))
    with _decoding(path, f"{syntax.name} pixel data could not be decoded"):
        # Stored values are measured as they are: no modality LUT or rescale (Hounsfield units
        # and such are the reader's business). YBR is converted to RGB and a palette applied,
        # so thumbnails look right.
        pixels: NDArray[Any] = ds.pixel_array
        if photometric == "PALETTE COLOR":
            pixels = apply_color_lut(pixels, ds)
    modality = header.get("Modality")
    tags: Tags = {
        "modality": None if modality is None else str(modality),
        "rows": rows,
        "columns": columns,
        "bits_stored": bits_stored or None,
        "photometric": photometric or None,
        "transfer_syntax": str(syntax),
    }
    return Decoded(list(pixels) if n_frames > 1 else [pixels], tags)


# -- PNG, JPEG, TIFF -------------------------------------------------------------------------------


def _pillow_samples(image: Image.Image) -> int:
    # A palette image decodes to RGB(A): count what it will take, not the index plane.
    return 4 if image.mode in ("P", "PA") else len(image.getbands())


def _pillow_array(image: Image.Image) -> NDArray[Any]:
    if image.mode in ("P", "PA"):
        is_alpha = image.mode == "PA" or "transparency" in image.info
        image = image.convert("RGBA" if is_alpha else "RGB")
    return np.asarray(image)


def _read_pillow(path: Path, max_pixels: int, max_frames: int) -> Decoded:
    """PNG or JPEG: Pillow reads the size from the header, then decodes the first frame."""
    with (
        _decoding(path, "the image could not be decoded"),
        Image.open(path, formats=["PNG", "JPEG"]) as image,
    ):
        _check_pixels(path, image.width * image.height * _pillow_samples(image), max_pixels)
        frame = _pillow_array(image)
    return Decoded([frame], {})


def _samples_last(pixels: NDArray[Any], axes: str) -> NDArray[Any]:
    if axes in ("YX", "YXS"):
        return pixels
    if axes == "SYX":
        return np.moveaxis(pixels, 0, -1)
    raise ValueError("unsupported TIFF page layout")


def _can_decode(page: tifffile.TiffPage) -> bool:
    # Without imagecodecs, tifffile decodes only raw and deflate; Pillow has LZW, PackBits, JPEG.
    return page.compression in tifffile.TIFF.DECOMPRESSORS and (
        page.predictor == 1 or page.predictor in tifffile.TIFF.UNPREDICTORS
    )


def _read_tiff(path: Path, max_pixels: int, max_frames: int) -> Decoded:
    """TIFF: every full-resolution page is a frame; reduced-resolution copies are skipped."""
    with _decoding(path, "the TIFF could not be decoded"), tifffile.TiffFile(path) as tif:
        pages = []
        # Pages are parsed lazily: stop at the limit, before thousands of tiny pages cost
        # seconds and memory on their own.
        for index, page in enumerate(tif.pages):
            _check_frames(path, index + 1, max_frames)
            if isinstance(page, tifffile.TiffPage) and not page.is_reduced:
                pages.append((index, page))
        if not pages:
            raise ProcessorError(path, "no_image", "no full-resolution page")
        _check_pixels(path, sum(math.prod(page.shape) for _, page in pages), max_pixels)
        if all(_can_decode(page) for _, page in pages):
            frames = [_samples_last(page.asarray(), page.axes) for _, page in pages]
        else:
            frames = _pillow_frames(path, [index for index, _ in pages])
    return Decoded(frames, {})


def _pillow_frames(path: Path, indices: Sequence[int]) -> list[NDArray[Any]]:
    frames = []
    with Image.open(path, formats=["TIFF"]) as image:
        for index in indices:
            image.seek(index)
            frames.append(_pillow_array(image))
    return frames


READERS = {"dicom": _read_dicom, "pillow": _read_pillow, "tiff": _read_tiff}


def read_image(path: Path, max_pixels: int, max_frames: int) -> Decoded:
    """Decode one image file, refusing it (`ProcessorError`) before decoding if it declares more
    than `max_pixels` samples or `max_frames` frames."""
    return READERS[_sniff(path)](path, max_pixels, max_frames)

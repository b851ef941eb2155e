"""Image format readers (DICOM, PNG, JPEG, TIFF): sniff by content, guard the decoded size from
the header, decode to stored values. Runs in worker processes, for the imaging processor.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import tifffile
from numpy.typing import NDArray
from PIL import Image, ImageMode

from daemon.processors.base import ProcessorError
from daemon.processors.dicom_reader import read_dicom
from daemon.processors.image_guards import (
    Decoded,
    Limits,
    Source,
    check_frames,
    check_size,
    decoding,
)

__all__ = ["Decoded", "Limits", "Source", "read_image"]

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
JPEG_MAGIC = b"\xff\xd8\xff"
TIFF_MAGICS = (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+")
# Pillow holds its decoded image and `np.asarray` makes the array from a bytes copy of it.
PILLOW_COPIES = 3
TIFF_COPIES = 1  # tifffile decodes into the array it returns


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


# -- PNG, JPEG ---------------------------------------------------------------------------------


def _pillow_shape(image: Image.Image) -> tuple[int, int]:
    """Samples per pixel and bytes per sample of the array this image decodes to."""
    if image.mode in ("P", "PA"):
        return 4, 1  # a palette image decodes to RGB(A): count what it takes, not the indices
    typestr = ImageMode.getmode(image.mode).typestr
    return len(image.getbands()), max(1, np.dtype(typestr).itemsize)


def _pillow_array(image: Image.Image) -> NDArray[Any]:
    if image.mode in ("P", "PA"):
        is_alpha = image.mode == "PA" or "transparency" in image.info
        image = image.convert("RGBA" if is_alpha else "RGB")
    return np.asarray(image)


def _is_photograph(image: Image.Image) -> bool:
    return image.format == "JPEG" or image.mode in ("RGB", "RGBA", "P", "PA", "CMYK", "YCbCr")


def _read_pillow(path: Path, limits: Limits) -> Decoded:
    """PNG or JPEG: Pillow reads the size and mode from the header, then decodes one frame."""
    with (
        decoding(path, "the image could not be decoded"),
        Image.open(path, formats=["PNG", "JPEG"]) as image,
    ):
        samples, sample_bytes = _pillow_shape(image)
        check_size(path, image.width * image.height * samples, sample_bytes, PILLOW_COPIES, limits)
        frame = _pillow_array(image)
        source = Source.PHOTOGRAPH if _is_photograph(image) else Source.IMAGE
    return Decoded([frame], {}, source)


# -- TIFF --------------------------------------------------------------------------------------


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


def _tiff_pages(path: Path, tif: tifffile.TiffFile, limits: Limits) -> list[tuple[int, Any]]:
    """The full-resolution pages, once their count and decoded size are known to fit."""
    pages = []
    # Pages are parsed lazily: stop at the limit, before thousands of tiny pages cost seconds
    # and memory on their own.
    for index, page in enumerate(tif.pages):
        check_frames(path, index + 1, limits)
        if isinstance(page, tifffile.TiffPage) and not page.is_reduced:
            pages.append((index, page))
    if not pages:
        raise ProcessorError(path, "no_image", "no full-resolution page")
    n_samples = sum(math.prod(page.shape) for _, page in pages)
    sample_bytes = max(np.dtype(page.dtype).itemsize for _, page in pages)
    copies = TIFF_COPIES if all(_can_decode(page) for _, page in pages) else PILLOW_COPIES
    check_size(path, n_samples, sample_bytes, copies, limits)
    return pages


def _read_tiff(path: Path, limits: Limits) -> Decoded:
    """TIFF: every full-resolution page is a frame; reduced-resolution copies are skipped."""
    with decoding(path, "the TIFF could not be decoded"), tifffile.TiffFile(path) as tif:
        pages = _tiff_pages(path, tif, limits)
        if all(_can_decode(page) for _, page in pages):
            frames = [_samples_last(page.asarray(), page.axes) for _, page in pages]
        else:
            frames = _pillow_frames(path, [index for index, _ in pages])
    is_colour = any(f.ndim == 3 and f.shape[-1] >= 3 for f in frames)
    return Decoded(frames, {}, Source.PHOTOGRAPH if is_colour else Source.IMAGE)


def _pillow_frames(path: Path, indices: Sequence[int]) -> list[NDArray[Any]]:
    frames = []
    with Image.open(path, formats=["TIFF"]) as image:
        for index in indices:
            image.seek(index)
            frames.append(_pillow_array(image))
    return frames


READERS = {"dicom": read_dicom, "pillow": _read_pillow, "tiff": _read_tiff}


def read_image(path: Path, limits: Limits) -> Decoded:
    """Decode one image file, refusing it (`ProcessorError`) before decoding if its header
    declares more than the limits allow."""
    return READERS[_sniff(path)](path, limits)

"""What every image reader shares: the decoded result, the limits checked from a header before any
pixel is decoded, and the mapping of library failures to quarantine reasons. Runs in workers.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import Any

from numpy.typing import NDArray
from PIL import Image

from daemon.processors.base import ProcessorError

Tags = dict[str, str | int | float | None]


class Source(StrEnum):
    """Where the pixels come from, which decides whether a thumbnail may show them."""

    DICOM = "dicom"
    # DICOM that says or usually has burned-in text (BurnedInAnnotation YES; US, SC, XC …)
    BURNED_IN = "dicom_burned_in"
    IMAGE = "image"  # a grey PNG or TIFF: a scan, a plot, a microscope plane
    PHOTOGRAPH = "photograph"  # a JPEG, or a colour PNG or TIFF: may show a face


@dataclass(frozen=True, slots=True)
class Limits:
    """A file is refused before decoding if it declares more than these."""

    max_pixels: int  # samples: rows x columns x frames x samples per pixel
    max_image_bytes: int  # what decoding holds at its peak, in bytes
    max_frames: int


@dataclass(frozen=True, slots=True)
class Decoded:
    frames: list[NDArray[Any]]  # stored values, each (h, w) or (h, w, samples)
    tags: Tags  # the safe DICOM tags; never a patient attribute
    source: Source = Source.IMAGE
    # Modality LUT (DICOM RescaleSlope / RescaleIntercept): statistics are reported on
    # value * slope + intercept, Hounsfield units for CT.
    rescale: tuple[float, float] = (1.0, 0.0)
    sort_key: tuple[int, int] = field(default=(2**31, 2**31))  # (series, instance)


def check_frames(path: Path, n_frames: int, limits: Limits) -> None:
    if n_frames > limits.max_frames:
        raise ProcessorError(path, "too_many_frames", f"more than max_frames ({limits.max_frames})")


def check_size(path: Path, n_samples: int, sample_bytes: int, factor: int, limits: Limits) -> None:
    """Refuse a file whose declared pixels would take more than the limits once decoded.

    `factor` is how many copies of the decoded pixels the reader holds at its peak (Pillow's
    image and the array made from it; DICOM's PixelData bytes and the array)."""
    if n_samples > limits.max_pixels:
        raise ProcessorError(
            path, "too_many_pixels", f"{n_samples} samples declared, limit {limits.max_pixels}"
        )
    n_bytes = n_samples * sample_bytes * factor
    if n_bytes > limits.max_image_bytes:
        raise ProcessorError(
            path,
            "too_many_pixel_bytes",
            f"decoding takes {n_bytes} bytes, limit max_image_bytes {limits.max_image_bytes}",
        )


@contextmanager
def decoding(path: Path, what: str) -> Iterator[None]:
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

"""Medical images (DICOM, PNG, TIFF, JPEG): one row of pixel statistics per image, or per frame,
and a contact sheet of thumbnails. Runs in worker processes.
"""

from __future__ import annotations

import hashlib
import logging
import math
import warnings
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import pandas as pd
import tifffile
from numpy.typing import NDArray
from PIL import Image
from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.pixels.decoders.base import get_decoder
from pydicom.pixels.processing import apply_color_lut
from pydicom.uid import UID, JPEGExtended12Bit
from skimage.color import rgb2gray
from skimage.io import imsave
from skimage.transform import resize, rotate
from skimage.util import montage

from daemon.processors.base import Facts, ProcessorError
from daemon.processors.options import ImagingOptions

Row = dict[str, str | int | float | None]

DICOM_COLUMNS = ("modality", "rows", "columns", "bits_stored", "photometric", "transfer_syntax")
COLUMNS = (
    "source", "sha256", "frame", "width", "height", "frames", "channels", "dtype",
    "mean", "std", "min", "max", *DICOM_COLUMNS,
)  # fmt: skip
INT_COLUMNS = ("frame", "width", "height", "frames", "channels", "rows", "columns", "bits_stored")
FLOAT_COLUMNS = ("mean", "std", "min", "max")
TEXT_COLUMNS = tuple(c for c in COLUMNS if c not in INT_COLUMNS + FLOAT_COLUMNS)
FORMULA_PREFIXES = ("=", "+", "-", "@", "\t", "\r")
RESULT_NAME = "result.csv"
SHEET_NAME = "contact_sheet.png"
SHEET_PADDING_PX = 2

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
JPEG_MAGIC = b"\xff\xd8\xff"
TIFF_MAGICS = (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+")
PIXEL_KEYWORDS = ("PixelData", "FloatPixelData", "DoubleFloatPixelData")
# Library warnings about the data itself (pydicom's invalid values, Pillow's bomb warning below our
# own limit) are counted per file; deprecations stay loud.
DATA_WARNINGS = (UserWarning, RuntimeWarning)


@dataclass(frozen=True, slots=True, eq=False)  # arrays have no truth value: compare by identity
class Thumbnail:
    sha256: str
    source: str
    pixels: NDArray[np.uint8]  # (h, w) grey or (h, w, 3) RGB, at most thumbnail_px a side


@dataclass(frozen=True, slots=True)
class ImagingPartial:
    rows: tuple[Row, ...] = ()
    thumbnails: tuple[Thumbnail, ...] = ()


@dataclass(frozen=True, slots=True)
class _Decoded:
    frames: list[NDArray[Any]]  # stored values, each (h, w) or (h, w, samples)
    tags: Row  # the safe DICOM tags; never a patient attribute


@dataclass(frozen=True, slots=True)
class _Moments:
    """Count, mean, sum of squared deviations, min and max, combined with Chan et al.'s update."""

    n: int = 0
    mean: float = 0.0
    m2: float = 0.0
    low: float = math.inf
    high: float = -math.inf

    @classmethod
    def of(cls, values: NDArray[Any]) -> _Moments:
        if values.size == 0:
            return cls()
        return cls(
            n=values.size,
            mean=float(np.mean(values, dtype=np.float64)),
            m2=float(np.var(values, dtype=np.float64)) * values.size,
            low=float(np.min(values)),
            high=float(np.max(values)),
        )

    def combine(self, other: _Moments) -> _Moments:
        n = self.n + other.n
        if not n:
            return self
        delta = other.mean - self.mean
        return _Moments(
            n=n,
            mean=self.mean + delta * (other.n / n),
            m2=self.m2 + other.m2 + delta * delta * self.n * (other.n / n),
            low=min(self.low, other.low),
            high=max(self.high, other.high),
        )

    def stats(self) -> Row:
        if not self.n:
            return {"mean": None, "std": None, "min": None, "max": None}
        return {"mean": self.mean, "std": math.sqrt(self.m2 / self.n), "min": self.low,
                "max": self.high}  # fmt: skip


def neutralise(value: str) -> str:
    """OWASP CSV-injection rule: a text cell that a spreadsheet would run gets a leading quote."""
    return "'" + value if value.startswith(FORMULA_PREFIXES) else value


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


def _sha256(path: Path) -> str:
    with path.open("rb") as fh:
        return hashlib.file_digest(fh, "sha256").hexdigest()


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


def _read_dicom(path: Path, max_pixels: int) -> _Decoded:
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
    tags: Row = {
        "modality": None if modality is None else str(modality),
        "rows": rows,
        "columns": columns,
        "bits_stored": bits_stored or None,
        "photometric": photometric or None,
        "transfer_syntax": str(syntax),
    }
    return _Decoded(list(pixels) if n_frames > 1 else [pixels], tags)


# -- PNG, JPEG, TIFF -------------------------------------------------------------------------------


def _pillow_samples(image: Image.Image) -> int:
    # A palette image decodes to RGB(A): count what it will take, not the index plane.
    return 4 if image.mode in ("P", "PA") else len(image.getbands())


def _pillow_array(image: Image.Image) -> NDArray[Any]:
    if image.mode in ("P", "PA"):
        is_alpha = image.mode == "PA" or "transparency" in image.info
        image = image.convert("RGBA" if is_alpha else "RGB")
    return np.asarray(image)


def _read_pillow(path: Path, max_pixels: int) -> _Decoded:
    """PNG or JPEG: Pillow reads the size from the header, then decodes the first frame."""
    with (
        _decoding(path, "the image could not be decoded"),
        Image.open(path, formats=["PNG", "JPEG"]) as image,
    ):
        _check_pixels(path, image.width * image.height * _pillow_samples(image), max_pixels)
        frame = _pillow_array(image)
    return _Decoded([frame], {})


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


def _read_tiff(path: Path, max_pixels: int) -> _Decoded:
    """TIFF: every full-resolution page is a frame; reduced-resolution copies are skipped."""
    with _decoding(path, "the TIFF could not be decoded"), tifffile.TiffFile(path) as tif:
        pages = [
            (index, page)
            for index, page in enumerate(tif.pages)
            if isinstance(page, tifffile.TiffPage) and not page.is_reduced
        ]
        if not pages:
            raise ProcessorError(path, "no_image", "no full-resolution page")
        _check_pixels(path, sum(math.prod(page.shape) for _, page in pages), max_pixels)
        if all(_can_decode(page) for _, page in pages):
            frames = [_samples_last(page.asarray(), page.axes) for _, page in pages]
        else:
            frames = _pillow_frames(path, [index for index, _ in pages])
    return _Decoded(frames, {})


def _pillow_frames(path: Path, indices: Sequence[int]) -> list[NDArray[Any]]:
    frames = []
    with Image.open(path, formats=["TIFF"]) as image:
        for index in indices:
            image.seek(index)
            frames.append(_pillow_array(image))
    return frames


READERS = {"dicom": _read_dicom, "pillow": _read_pillow, "tiff": _read_tiff}


# -- measuring ---------------------------------------------------------------------------------


def _thumbnail(frame: NDArray[Any], is_8bit: bool, size_px: int) -> NDArray[np.uint8]:
    """A small uint8 picture of one frame; deeper data is windowed on its 1st-99th percentile."""
    if frame.ndim == 3:
        frame = frame[..., :3] if frame.shape[-1] >= 3 else frame[..., 0]
    height, width = frame.shape[:2]
    step = max(1, max(height, width) // (4 * size_px))
    frame = frame[::step, ::step]  # cheap decimation first: resize copies to float64
    scale = size_px / max(frame.shape[:2])
    if scale < 1:
        shape = (max(1, round(frame.shape[0] * scale)), max(1, round(frame.shape[1] * scale)))
        frame = resize(frame, shape, preserve_range=True, anti_aliasing=True)  # type: ignore[no-untyped-call]
    small = np.nan_to_num(frame.astype(np.float64), nan=0.0, posinf=0.0, neginf=0.0)
    if not is_8bit:
        low, high = (float(v) for v in np.percentile(small, (1, 99)))
        if high <= low:
            low, high = float(small.min()), float(small.max())
        small = (small - low) * (255.0 / (high - low)) if high > low else np.zeros_like(small)
    return np.clip(np.rint(small), 0, 255).astype(np.uint8)


def _contact_sheet(thumbnails: Sequence[NDArray[np.uint8]]) -> NDArray[np.uint8]:
    """Thumbnails centred on tiles of a common size, in a grid about as wide as it is tall."""
    is_rgb = any(t.ndim == 3 for t in thumbnails)
    height = max(t.shape[0] for t in thumbnails)
    width = max(t.shape[1] for t in thumbnails)
    tiles = np.zeros((len(thumbnails), height, width, 3 if is_rgb else 1), np.uint8)
    for tile, thumbnail in zip(tiles, thumbnails, strict=True):
        top, left = (height - thumbnail.shape[0]) // 2, (width - thumbnail.shape[1]) // 2
        pixels = thumbnail if thumbnail.ndim == 3 else thumbnail[..., np.newaxis]
        tile[top : top + pixels.shape[0], left : left + pixels.shape[1]] = pixels
    n_cols = math.ceil(math.sqrt(len(thumbnails)))
    sheet: NDArray[np.uint8] = montage(
        tiles,
        fill=(0,) * tiles.shape[-1],
        grid_shape=(math.ceil(len(thumbnails) / n_cols), n_cols),
        padding_width=SHEET_PADDING_PX,
        channel_axis=-1,
    )
    return sheet if is_rgb else sheet[..., 0]


def _row_key(row: Row) -> tuple[str, int, str]:
    frame = row["frame"]
    return (str(row["sha256"]), frame if isinstance(frame, int) else -1, str(row["source"]))


class ImagingProcessor:
    kind: ClassVar[str] = "imaging"
    Options: ClassVar[type[ImagingOptions]] = ImagingOptions

    def __init__(self, options: ImagingOptions) -> None:
        self.options = options
        # pydicom logs each warning as well, and its warnings can quote a tag's value (a birth
        # date): keep them out of the service's logs. Only the count reaches the facts.
        logging.getLogger("pydicom").propagate = False

    def read(self, path: Path, name: str) -> tuple[ImagingPartial, Facts]:
        sha256 = _sha256(path)
        reader = READERS[_sniff(path)]
        with warnings.catch_warnings(record=True) as caught:
            for category in DATA_WARNINGS:
                warnings.simplefilter("always", category)
            decoded = reader(path, self.options.max_pixels)
            rows, thumbnail = self._measure(decoded, name, sha256)
        facts: Facts = {"images": len(rows), "frames": len(decoded.frames)}
        n_warnings = sum(issubclass(w.category, DATA_WARNINGS) for w in caught)
        if n_warnings:
            facts["warnings"] = n_warnings
        return ImagingPartial(tuple(rows), (Thumbnail(sha256, name, thumbnail),)), facts

    def _transform(self, frame: NDArray[Any]) -> NDArray[Any]:
        options = self.options
        if frame.dtype == np.bool_:
            frame = frame.astype(np.uint8)
        if options.grey and frame.ndim == 3 and frame.shape[-1] in (3, 4):
            # From float, rgb2gray keeps the stored range (from integers it would scale to 0..1).
            frame = rgb2gray(frame[..., :3].astype(np.float64))
        if options.rotate_deg % 360:
            frame = rotate(frame, options.rotate_deg, resize=True, preserve_range=True)  # type: ignore[no-untyped-call]
        if options.resize is not None:
            frame = resize(frame, options.resize, preserve_range=True)  # type: ignore[no-untyped-call]
        return frame

    def _measure(
        self, decoded: _Decoded, source: str, sha256: str
    ) -> tuple[list[Row], NDArray[np.uint8]]:
        """Transform and measure frame by frame, so that one float copy is alive at a time."""
        is_8bit = decoded.frames[0].dtype in (np.uint8, np.bool_)
        common: Row = {"source": source, "sha256": sha256, "frames": len(decoded.frames),
                       "dtype": decoded.frames[0].dtype.name, **dict.fromkeys(DICOM_COLUMNS),
                       **decoded.tags}  # fmt: skip
        rows: list[Row] = []
        total = _Moments()
        first: Row = {}
        thumbnail = np.zeros((1, 1), np.uint8)
        for index, frame in enumerate(decoded.frames):
            measured = self._transform(frame)
            shape: Row = {
                "width": measured.shape[1],
                "height": measured.shape[0],
                "channels": measured.shape[2] if measured.ndim == 3 else 1,
            }
            moments = _Moments.of(measured)
            if self.options.per_frame:
                rows.append({**common, "frame": index, **shape, **moments.stats()})
            total = total.combine(moments)
            if index == 0:
                first = shape
                thumbnail = _thumbnail(measured, is_8bit, self.options.thumbnail_px)
        if not self.options.per_frame:
            rows.append({**common, "frame": None, **first, **total.stats()})
        return rows, thumbnail

    def merge(self, partials: Sequence[ImagingPartial]) -> ImagingPartial:
        """Concatenate, sorted by content hash, frame and name: any split gives the same order."""
        rows = sorted((row for p in partials for row in p.rows), key=_row_key)
        thumbnails = sorted(
            (t for p in partials for t in p.thumbnails), key=lambda t: (t.sha256, t.source)
        )
        return ImagingPartial(tuple(rows), tuple(thumbnails))

    def write(self, merged: ImagingPartial, folder: Path) -> list[str]:
        table = pd.DataFrame(list(merged.rows), columns=list(COLUMNS))
        for column in INT_COLUMNS:
            table[column] = table[column].astype("Int64")
        for column in FLOAT_COLUMNS:
            table[column] = table[column].astype("float64")
        for column in TEXT_COLUMNS:
            table[column] = table[column].map(neutralise, na_action="ignore")
        table.to_csv(folder / RESULT_NAME, index=False, lineterminator="\n")
        if not merged.thumbnails:
            return [RESULT_NAME]
        sheet = _contact_sheet([t.pixels for t in merged.thumbnails])
        imsave(str(folder / SHEET_NAME), sheet, check_contrast=False)
        return [RESULT_NAME, SHEET_NAME]

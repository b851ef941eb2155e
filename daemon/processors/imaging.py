"""Medical images (DICOM, PNG, TIFF, JPEG): one row of pixel statistics per image, or per frame,
and a contact sheet of thumbnails. Decoding lives in `image_readers`. Runs in worker processes.
"""

from __future__ import annotations

import csv
import hashlib
import logging
import math
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import pandas as pd
from numpy.typing import NDArray
from skimage.color import rgb2gray
from skimage.io import imsave
from skimage.transform import resize, rotate
from skimage.util import montage

from daemon.processors.base import Facts
from daemon.processors.image_readers import Decoded, read_image
from daemon.processors.options import ImagingOptions
from daemon.processors.tables import neutralise

Row = dict[str, str | int | float | None]

DICOM_COLUMNS = ("modality", "rows", "columns", "bits_stored", "photometric", "transfer_syntax")
COLUMNS = (
    "source", "sha256", "frame", "width", "height", "frames", "channels", "dtype",
    "mean", "std", "min", "max", *DICOM_COLUMNS,
)  # fmt: skip
INT_COLUMNS = ("frame", "width", "height", "frames", "channels", "rows", "columns", "bits_stored")
FLOAT_COLUMNS = ("mean", "std", "min", "max")
TEXT_COLUMNS = tuple(c for c in COLUMNS if c not in INT_COLUMNS + FLOAT_COLUMNS)
RESULT_NAME = "result.csv"
SHEET_NAME = "contact_sheet.png"
SHEET_PADDING_PX = 2

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


def _sha256(path: Path) -> str:
    with path.open("rb") as fh:
        return hashlib.file_digest(fh, "sha256").hexdigest()


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
        with warnings.catch_warnings(record=True) as caught:
            for category in DATA_WARNINGS:
                warnings.simplefilter("always", category)
            decoded = read_image(path, self.options.max_pixels, self.options.max_frames)
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
        self, decoded: Decoded, source: str, sha256: str
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
        # Text quoted, numbers bare: a CR inside a file name must not start a row of its own.
        table.to_csv(
            folder / RESULT_NAME, index=False, quoting=csv.QUOTE_NONNUMERIC, lineterminator="\n"
        )
        if not merged.thumbnails:
            return [RESULT_NAME]
        sheet = _contact_sheet([t.pixels for t in merged.thumbnails])
        imsave(str(folder / SHEET_NAME), sheet, check_contrast=False)
        return [RESULT_NAME, SHEET_NAME]

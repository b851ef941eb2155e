"""Medical images (DICOM, PNG, TIFF, JPEG): one row of pixel statistics per image, or per frame,
and a numbered contact sheet of thumbnails. Decoding lives in `image_readers`. Runs in workers.
"""

from __future__ import annotations

import hashlib
import logging
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
from numpy.typing import NDArray
from PIL import Image

from daemon.processors.base import Facts
from daemon.processors.image_readers import Decoded, Limits, read_image
from daemon.processors.image_sheet import contact_sheet, is_shown, thumbnail
from daemon.processors.image_stats import Moments
from daemon.processors.imaging_series import (
    DESCRIPTION_KEY,
    SERIES_KEY,
    SERIES_NAME,
    number_series,
    series_rows,
    write_series,
)
from daemon.processors.options import ImagingOptions
from daemon.processors.tables import write_small_csv

Row = dict[str, str | int | float | None]

DICOM_COLUMNS = (
    "units", "rescale_slope", "rescale_intercept", "pixel_spacing_row_mm", "pixel_spacing_col_mm",
    "slice_thickness_mm", "series_number", "instance_number", "modality", "rows", "columns",
    "bits_stored", "photometric", "transfer_syntax",
)  # fmt: skip
STAT_COLUMNS = ("mean", "std", "min", "max")
RAW_COLUMNS = tuple(f"raw_{c}" for c in STAT_COLUMNS)
COLUMNS = (
    "source", "sha256", "tile", "frame", "width", "height", "frames", "channels", "dtype",
    *STAT_COLUMNS, *RAW_COLUMNS, *DICOM_COLUMNS, "series",
)  # fmt: skip
INT_COLUMNS = ("tile", "frame", "width", "height", "frames", "channels", "series_number",
               "instance_number", "rows", "columns", "bits_stored", "series")  # fmt: skip
FLOAT_COLUMNS = (*STAT_COLUMNS, *RAW_COLUMNS, "rescale_slope", "rescale_intercept",
                 "pixel_spacing_row_mm", "pixel_spacing_col_mm", "slice_thickness_mm")  # fmt: skip
TEXT_COLUMNS = tuple(c for c in COLUMNS if c not in INT_COLUMNS + FLOAT_COLUMNS)
RESULT_NAME = "result.csv"
SHEET_NAME = "contact_sheet.png"
NO_NUMBER = 2**31  # sorts images without a series or instance number last

# Library warnings about the data itself (pydicom's invalid values, Pillow's bomb warning below our
# own limit) are counted per file; deprecations stay loud.
DATA_WARNINGS = (UserWarning, RuntimeWarning)

SortKey = tuple[int, int, int, str, str]


@dataclass(frozen=True, slots=True, eq=False)  # arrays have no truth value: compare by identity
class Thumbnail:
    key: SortKey  # the image's place among the rows
    pixels: NDArray[np.uint8]  # (h, w) grey or (h, w, 3) RGB, at most thumbnail_px a side


@dataclass(frozen=True, slots=True)
class ImagingPartial:
    rows: tuple[Row, ...] = ()
    thumbnails: tuple[Thumbnail, ...] = ()


def _sha256(path: Path) -> str:
    with path.open("rb") as fh:
        return hashlib.file_digest(fh, "sha256").hexdigest()


def image_key(row: Row) -> SortKey:
    """DICOM by series then instance number, then everything else by name; hash breaks ties."""
    series, instance = row.get("series_number"), row.get("instance_number")
    return (
        0 if row.get("transfer_syntax") else 1,
        series if isinstance(series, int) else NO_NUMBER,
        instance if isinstance(instance, int) else NO_NUMBER,
        str(row["source"]),
        str(row["sha256"]),
    )


def _row_key(row: Row) -> tuple[SortKey, int]:
    frame = row["frame"]
    return image_key(row), frame if isinstance(frame, int) else -1


class ImagingProcessor:
    kind: ClassVar[str] = "imaging"
    Options: ClassVar[type[ImagingOptions]] = ImagingOptions

    def __init__(self, options: ImagingOptions) -> None:
        self.options = options
        self.limits = Limits(options.max_pixels, options.max_image_bytes, options.max_frames)
        # pydicom logs each warning as well, and its warnings can quote a tag's value (a birth
        # date): keep them out of the service's logs. Only the count reaches the facts.
        logging.getLogger("pydicom").propagate = False

    def read(self, path: Path, name: str) -> tuple[ImagingPartial, Facts]:
        sha256 = _sha256(path)
        with warnings.catch_warnings(record=True) as caught:
            for category in DATA_WARNINGS:
                warnings.simplefilter("always", category)
            decoded = read_image(path, self.limits)
            if self.options.series_description != "include":
                decoded.tags.pop(DESCRIPTION_KEY, None)  # free text: never past this worker
            rows, small = self._measure(decoded, name, sha256)
        is_on_sheet = is_shown(self.options.contact_sheet, decoded.source)
        shown = "shown" if is_on_sheet else f"withheld_{decoded.source}"
        facts: Facts = {"images": len(rows), "frames": len(decoded.frames), "thumbnail": shown}
        n_warnings = sum(issubclass(w.category, DATA_WARNINGS) for w in caught)
        if n_warnings:
            facts["warnings"] = n_warnings
        thumbnails = (Thumbnail(image_key(rows[0]), small),) if is_on_sheet else ()
        return ImagingPartial(tuple(rows), thumbnails), facts

    @staticmethod
    def preload_optional() -> None:
        """scikit-image's colour and geometry modules (they load scipy)."""
        from skimage.color import rgb2gray  # noqa: F401
        from skimage.transform import resize, rotate  # noqa: F401

    def _transform(self, frame: NDArray[Any]) -> NDArray[Any]:
        # scikit-image's colour and geometry modules load scipy (about 0.3 s of each worker's
        # start): imported by the options that use them, not by every imaging worker.
        options = self.options
        if frame.dtype == np.bool_:
            frame = frame.astype(np.uint8)
        if options.grey and frame.ndim == 3 and frame.shape[-1] in (3, 4):
            # From float, rgb2gray keeps the stored range (from integers it would scale to 0..1).
            from skimage.color import rgb2gray

            frame = rgb2gray(frame[..., :3].astype(np.float64))
        if options.rotate_deg % 360:
            from skimage.transform import rotate

            frame = rotate(frame, options.rotate_deg, resize=True, preserve_range=True)  # type: ignore[no-untyped-call]
        if options.resize is not None:
            from skimage.transform import resize

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
        total = Moments()
        first: Row = {}
        small = np.zeros((1, 1), np.uint8)
        for index, frame in enumerate(decoded.frames):
            measured = self._transform(frame)
            shape: Row = {
                "width": measured.shape[1],
                "height": measured.shape[0],
                "channels": measured.shape[2] if measured.ndim == 3 else 1,
            }
            moments = Moments.of(measured)
            if self.options.per_frame:
                rows.append({**common, "frame": index, **shape, **_stats(moments, decoded)})
            total = total.combine(moments)
            if index == 0:
                first = shape
                small = thumbnail(measured, is_8bit, self.options.thumbnail_px)
        if not self.options.per_frame:
            rows.append({**common, "frame": None, **first, **_stats(total, decoded)})
        return rows, small

    def merge(self, partials: Sequence[ImagingPartial]) -> ImagingPartial:
        """Concatenate in the clinical order (series, instance, name), content hash and frame
        breaking ties: any split of the batch gives the same order."""
        rows = sorted((row for p in partials for row in p.rows), key=_row_key)
        thumbnails = sorted((t for p in partials for t in p.thumbnails), key=lambda t: t.key)
        return ImagingPartial(tuple(rows), tuple(thumbnails))

    def write(self, merged: ImagingPartial, folder: Path) -> list[str]:
        tiles = {t.key: number for number, t in enumerate(merged.thumbnails, start=1)}
        numbers = number_series(merged.rows)
        rows = [
            {
                **row,
                "tile": tiles.get(image_key(row)),
                "series": numbers.get(str(row.get(SERIES_KEY))),
            }
            for row in merged.rows
        ]
        # Text quoted, numbers bare: a CR inside a file name must not start a row of its own.
        write_small_csv(folder / RESULT_NAME, rows, COLUMNS, ints=INT_COLUMNS, floats=FLOAT_COLUMNS)
        written = [RESULT_NAME]
        if merged.thumbnails:
            sheet = contact_sheet([t.pixels for t in merged.thumbnails])
            # Fast zlib: a contact sheet is looked at, not archived.
            Image.fromarray(sheet).save(folder / SHEET_NAME, format="PNG", compress_level=1)
            written.append(SHEET_NAME)
        if numbers:  # DICOM in the batch: one row per series beside the per-image rows
            write_series(series_rows(merged.rows, numbers), folder)
            written.append(SERIES_NAME)
        return written


def _stats(moments: Moments, decoded: Decoded) -> Row:
    """Statistics after the modality LUT, and of the stored values as `raw_*`."""
    raw = moments.stats()
    return {**moments.stats(*decoded.rescale), **{f"raw_{k}": v for k, v in raw.items()}}

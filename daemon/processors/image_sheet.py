"""Thumbnails and the contact sheet: one numbered tile per image shown, the number being the
`tile` column of its rows in result.csv. Runs in worker processes."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np
from numpy.typing import NDArray
from PIL import Image, ImageDraw

from daemon.processors.image_guards import Source

SHEET_PADDING_PX = 2
LABEL_PADDING_PX = 1


def is_shown(setting: str, source: Source) -> bool:
    """Whether an image's thumbnail goes on the contact sheet: "on", "off", or "auto" (not for
    DICOM with burned-in text, nor for photographs)."""
    if setting == "auto":
        return source in (Source.DICOM, Source.IMAGE)
    return setting == "on"


def thumbnail(frame: NDArray[Any], is_8bit: bool, size_px: int) -> NDArray[np.uint8]:
    """A small uint8 picture of one frame; deeper data is windowed on its 1st-99th percentile."""
    if frame.ndim == 3:
        frame = frame[..., :3] if frame.shape[-1] >= 3 else frame[..., 0]
    factor = max(frame.shape[:2]) // size_px
    if factor >= 2:
        # Area averaging over factor x factor blocks: the anti-aliasing a Gaussian would give,
        # for a fraction of its cost (the Gaussian was a third of an image's time).
        height, width = (frame.shape[0] // factor) or 1, (frame.shape[1] // factor) or 1
        fy, fx = min(factor, frame.shape[0]), min(factor, frame.shape[1])
        blocks = frame[: height * fy, : width * fx].reshape(height, fy, width, fx, *frame.shape[2:])
        frame = blocks.mean(axis=(1, 3), dtype=np.float64)
    scale = size_px / max(frame.shape[:2])
    if scale < 1:
        from skimage.transform import resize  # loads scipy: only for sizes blocks cannot reach

        shape = (max(1, round(frame.shape[0] * scale)), max(1, round(frame.shape[1] * scale)))
        frame = resize(frame, shape, preserve_range=True, anti_aliasing=False)  # type: ignore[no-untyped-call]
    small = np.nan_to_num(frame.astype(np.float64), nan=0.0, posinf=0.0, neginf=0.0)
    if not is_8bit:
        low, high = (float(v) for v in np.percentile(small, (1, 99)))
        if high <= low:
            low, high = float(small.min()), float(small.max())
        small = (small - low) * (255.0 / (high - low)) if high > low else np.zeros_like(small)
    return np.clip(np.rint(small), 0, 255).astype(np.uint8)


def contact_sheet(thumbnails: Sequence[NDArray[np.uint8]]) -> NDArray[np.uint8]:
    """Thumbnails centred on tiles of a common size, in a grid about as wide as it is tall,
    each labelled with its 1-based number in reading order."""
    is_rgb = any(t.ndim == 3 for t in thumbnails)
    tile_h = max(t.shape[0] for t in thumbnails)
    tile_w = max(t.shape[1] for t in thumbnails)
    n_cols = math.ceil(math.sqrt(len(thumbnails)))
    n_rows = math.ceil(len(thumbnails) / n_cols)
    step_h, step_w = tile_h + SHEET_PADDING_PX, tile_w + SHEET_PADDING_PX
    sheet = np.zeros((n_rows * step_h + SHEET_PADDING_PX, n_cols * step_w + SHEET_PADDING_PX, 3),
                     np.uint8)  # fmt: skip
    corners = []
    for index, small in enumerate(thumbnails):
        row, col = divmod(index, n_cols)
        top = SHEET_PADDING_PX + row * step_h + (tile_h - small.shape[0]) // 2
        left = SHEET_PADDING_PX + col * step_w + (tile_w - small.shape[1]) // 2
        pixels = small if small.ndim == 3 else np.repeat(small[..., np.newaxis], 3, axis=-1)
        sheet[top : top + pixels.shape[0], left : left + pixels.shape[1]] = pixels
        corners.append((SHEET_PADDING_PX + col * step_w, SHEET_PADDING_PX + row * step_h))
    labelled = _label(Image.fromarray(sheet), corners)
    return labelled if is_rgb else labelled[..., 0]


def _label(sheet: Image.Image, corners: Sequence[tuple[int, int]]) -> NDArray[np.uint8]:
    """Each tile's number, white on a black box in its top-left corner."""
    draw = ImageDraw.Draw(sheet)
    for number, (left, top) in enumerate(corners, start=1):
        text = str(number)
        box = draw.textbbox((left + LABEL_PADDING_PX, top), text)
        draw.rectangle(
            (left, top, box[2] + LABEL_PADDING_PX, box[3] + LABEL_PADDING_PX), fill=(0, 0, 0)
        )
        draw.text((left + LABEL_PADDING_PX, top), text, fill=(255, 255, 255))
    return np.asarray(sheet, dtype=np.uint8)

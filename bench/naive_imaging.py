"""The plain baseline for imaging: one process, scikit-image, one image at a time.

    python bench/naive_imaging.py INPUT_DIR OUTPUT_DIR [--thumbnail-px 128]

Per image: sha256, imread, mean/std/min/max, a thumbnail with skimage.transform.resize; at the
end one result.csv and a contact_sheet.png montage of the thumbnails (as medbatch publishes).
"""

from __future__ import annotations

import argparse
import hashlib
import math
from pathlib import Path

import numpy as np
import pandas as pd
from numpy.typing import NDArray
from skimage.io import imread, imsave
from skimage.transform import resize
from skimage.util import montage


def to_uint8(image: NDArray[np.float64]) -> NDArray[np.uint8]:
    low, high = np.percentile(image, (1, 99))
    scaled = (image - low) * (255.0 / (high - low)) if high > low else np.zeros_like(image)
    small: NDArray[np.uint8] = np.clip(np.rint(scaled), 0, 255).astype(np.uint8)
    return small


def measure(path: Path, thumbnail_px: int) -> tuple[dict[str, object], NDArray[np.uint8]]:
    sha256 = hashlib.sha256(path.read_bytes()).hexdigest()
    image = imread(path)
    pixels = image.astype(np.float64)
    row = {
        "source": path.name,
        "sha256": sha256,
        "width": image.shape[1],
        "height": image.shape[0],
        "dtype": image.dtype.name,
        "mean": pixels.mean(),
        "std": pixels.std(),
        "min": pixels.min(),
        "max": pixels.max(),
    }
    thumbnail = resize(  # type: ignore[no-untyped-call]
        image, (thumbnail_px, thumbnail_px), anti_aliasing=True, preserve_range=True
    )
    return row, to_uint8(thumbnail)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("input_dir", type=Path)
    parser.add_argument("output_dir", type=Path)
    parser.add_argument("--thumbnail-px", type=int, default=128)
    args = parser.parse_args(argv)
    paths = sorted(p for p in args.input_dir.iterdir() if not p.name.startswith("."))
    rows, thumbnails = [], []
    for path in paths:
        row, thumbnail = measure(path, args.thumbnail_px)
        rows.append(row)
        thumbnails.append(thumbnail)
    args.output_dir.mkdir(parents=True, exist_ok=True)
    pd.DataFrame(rows).to_csv(args.output_dir / "result.csv", index=False)
    n_cols = math.ceil(math.sqrt(len(thumbnails)))
    sheet = montage(
        np.stack(thumbnails),
        grid_shape=(math.ceil(len(thumbnails) / n_cols), n_cols),
        padding_width=2,
    )
    imsave(str(args.output_dir / "contact_sheet.png"), sheet, check_contrast=False)
    print(f"{len(paths)} images")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

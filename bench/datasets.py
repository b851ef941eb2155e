"""Deterministic input data (EMR tables, 16-bit PNG images, wide expression tables), generated once
into a cache folder keyed by their parameters and copied into a fresh inbox for every run."""

from __future__ import annotations

import os
import random
import shutil
from collections.abc import Callable
from pathlib import Path

import numpy as np
from numpy.typing import NDArray

DIAGNOSES = ("asthma", "copd", "diabetes", "hypertension", "sepsis")
EMR_NUMERIC = ("age", "systolic_bp", "glucose")
# Gene IDs that spreadsheets and careless parsers mangle; they must come out byte-exact.
AWKWARD_GENES = ("SEPT2", "MARCH1", "1-Mar", "DEC1", "000123", "ENSG00000141510.16")
_COMPLETE = ".complete"


def emr_csv(rng: random.Random, rows: int = 50, missing_every: int = 0) -> bytes:
    """One EMR export (as tests/support/data.py writes them): every `missing_every`-th row has no
    blood pressure, and every 23rd (counting from 11) no glucose."""
    lines = ["patient_id,diagnosis,age,systolic_bp,glucose"]
    for i in range(rows):
        bp = "" if missing_every and i % missing_every == 0 else f"{rng.uniform(90, 180):.1f}"
        glucose = "" if missing_every and i % 23 == 11 else f"{rng.uniform(3, 15):.3f}"
        lines.append(
            f"{rng.randint(0, 999999):06d},{rng.choice(DIAGNOSES)},"
            f"{rng.randint(1, 99)},{bp},{glucose}"
        )
    return ("\n".join(lines) + "\n").encode()


def image_pixels(index: int, size_px: int = 512) -> NDArray[np.uint16]:
    """A smooth 16-bit scene (gradient, rings, a blob) plus noise: compresses like a real image."""
    rng = np.random.default_rng(1000 + index)
    y, x = np.mgrid[0:size_px, 0:size_px].astype(np.float64) / size_px
    cy, cx = rng.uniform(0.3, 0.7, 2)
    radius = np.hypot(y - cy, x - cx)
    scene = (
        12000 * x * rng.uniform(0.5, 1.5)
        + 8000 * y
        + 6000 * np.cos(radius * rng.uniform(10, 30))
        + 20000 * np.exp(-(radius**2) / 0.02)
    )
    noisy = scene + rng.normal(0, 300, scene.shape) + 10000
    pixels: NDArray[np.uint16] = np.clip(noisy, 0, 65535).astype(np.uint16)
    return pixels


def genomics_csv(index: int, genes: int, samples: int) -> bytes:
    """A wide table: `gene` then one column per sample of this plate (names unique per file).

    Every file has the same genes, so each gene's statistics merge across files; about 1 in 200
    values is missing.
    """
    rng = np.random.default_rng(5000 + index)
    names = [*AWKWARD_GENES, *(f"G{g:05d}" for g in range(genes - len(AWKWARD_GENES)))][:genes]
    base = rng.gamma(2.0, 3.0, size=(genes, 1))
    values = base + rng.normal(0.0, 1.0, size=(genes, samples))
    cells = np.char.mod("%.4f", values).astype(object)
    cells[rng.random(values.shape) < 0.005] = ""
    header = "gene," + ",".join(f"P{index:02d}_S{s:03d}" for s in range(samples))
    lines = [header]
    lines += [f"{name},{','.join(row)}" for name, row in zip(names, cells, strict=True)]
    return ("\n".join(lines) + "\n").encode()


def _cached(folder: Path, build: Callable[[Path], None]) -> Path:
    """Build into `<folder>.building`, then rename: a half-built cache is never used."""
    if (folder / _COMPLETE).exists():
        return folder
    building = folder.with_name(folder.name + ".building")
    shutil.rmtree(building, ignore_errors=True)
    shutil.rmtree(folder, ignore_errors=True)
    building.mkdir(parents=True)
    build(building)
    (building / _COMPLETE).touch()
    os.rename(building, folder)
    return folder


def emr_files(cache: Path, n_files: int, rows: int = 50, seed: int = 7) -> Path:
    def build(folder: Path) -> None:
        rng = random.Random(seed)
        for i in range(n_files):
            (folder / f"visit-{i:05d}.csv").write_bytes(emr_csv(rng, rows, missing_every=10))

    return _cached(cache / f"emr-v1-n{n_files}-r{rows}-s{seed}", build)


def image_files(cache: Path, n_files: int, size_px: int = 512) -> Path:
    from skimage.io import imsave

    def build(folder: Path) -> None:
        for i in range(n_files):
            pixels = image_pixels(i, size_px)
            imsave(str(folder / f"scan-{i:04d}.png"), pixels, check_contrast=False)

    return _cached(cache / f"png16-v1-n{n_files}-{size_px}px", build)


def genomics_files(cache: Path, n_files: int, genes: int, samples: int) -> Path:
    def build(folder: Path) -> None:
        for i in range(n_files):
            (folder / f"plate-{i:02d}.csv").write_bytes(genomics_csv(i, genes, samples))

    return _cached(cache / f"wide-v1-n{n_files}-g{genes}-s{samples}", build)


def inputs(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if not p.name.startswith("."))


def copy_into(source: Path, inbox: Path) -> int:
    """Copy every input into `inbox` the safe way (hidden temp, then rename); return bytes.

    The copies are written back to disk before this returns: the files are there before the
    clock starts, as the cached inputs the naive script and polars read are, so the kernel's
    writeback of the bench's own copying (20,000 files, or 2 GB) does not run on the service's
    clock."""
    inbox.mkdir(parents=True, exist_ok=True)
    total = 0
    for path in inputs(source):
        tmp = inbox / f".{path.name}.part"
        shutil.copyfile(path, tmp)
        os.rename(tmp, inbox / path.name)
        total += path.stat().st_size
    os.sync()
    return total


def _emr_block(seed: int, rows: int) -> bytes:
    """`rows` EMR rows without a header, vectorised (a 250 MB file in seconds, not minutes);
    about 1 in 10 rows misses a value."""
    rng = np.random.default_rng(seed)
    ids = np.char.zfill(rng.integers(0, 1_000_000, rows).astype(str), 6)
    diagnosis = np.array(DIAGNOSES)[rng.integers(0, len(DIAGNOSES), rows)]
    age = rng.integers(1, 100, rows).astype(str)
    bp = np.char.mod("%.1f", rng.uniform(90, 180, rows)).astype(object)
    glucose = np.char.mod("%.3f", rng.uniform(3, 15, rows)).astype(object)
    bp[rng.random(rows) < 0.06] = ""
    glucose[rng.random(rows) < 0.04] = ""
    columns = zip(ids, diagnosis, age, bp, glucose, strict=True)
    return "".join(f"{a},{b},{c},{d},{e}\n" for a, b, c, d, e in columns).encode()


def big_emr_files(cache: Path, n_files: int, mib: int) -> Path:
    """`n_files` EMR tables of about `mib` MiB each, made of a few distinct blocks in turn."""
    block_rows = 100_000

    def build(folder: Path) -> None:
        blocks = [_emr_block(seed, block_rows) for seed in range(4)]
        for i in range(n_files):
            with (folder / f"export-{i:02d}.csv").open("wb") as out:
                out.write(b"patient_id,diagnosis,age,systolic_bp,glucose\n")
                written, k = 0, i
                while written < mib * 2**20:
                    written += out.write(blocks[k % len(blocks)])
                    k += 1

    return _cached(cache / f"emr-big-v1-n{n_files}-{mib}mib", build)

"""Imaging throughput: 512 x 512 16-bit PNGs through `medbatch run --once` (kind "imaging") side
by side with the plain single-process scikit-image script; per-image statistics must agree."""

from __future__ import annotations

import functools
from pathlib import Path

import pandas as pd

from bench.baseline import compare_tables, run_baseline
from bench.datasets import copy_into, image_files
from bench.options import BenchOptions
from bench.section import SectionResult, best_of_each
from bench.service import ServiceTree, run_once, temp_root
from bench.throughput import record_naive, record_run, record_speedup

STATS = ["mean", "std", "min", "max"]
ONCE_TIMEOUT_S = 900
UNIT = "images"
SPEEDUP_TARGET = 2.0  # issue 13: imaging >= 2x the naive scikit-image script


def pipeline() -> dict[str, object]:
    return {
        "name": "imaging",
        "kind": "imaging",
        "priority": 3,
        "max_files": 50,
        "max_bytes": 512 * 1024**2,
        "max_wait": 60,
        "settle_s": 0,
        # Rows are matched to the naive script's by image name: publish names as dropped.
        "hash_names": False,
    }


def run_service(opts: BenchOptions, source: Path, result: SectionResult) -> pd.DataFrame:
    with temp_root("imaging") as root:
        tree = ServiceTree(root, [pipeline()], workers={"count": opts.workers})
        n_bytes = copy_into(source, tree.inbox("imaging"))
        result.add("input_mib", round(n_bytes / 2**20, 1), "MiB")
        run = run_once(tree, ONCE_TIMEOUT_S)
        record_run(result, "medbatch", run, opts.images, UNIT, opts.workers)
        folders = tree.published("imaging")
        result.add("medbatch_batches", len(folders))
        ours = pd.concat([pd.read_csv(p / "result.csv") for p in folders], ignore_index=True)
        sheets = sum((p / "contact_sheet.png").exists() for p in folders)
        result.check("one row per image", len(ours) == opts.images)
        result.check("a contact sheet per batch", sheets == len(folders))
        return ours


def run_naive(source: Path, n_images: int, result: SectionResult) -> pd.DataFrame:
    with temp_root("imaging-naive") as root:
        wall_s, cpu_s = run_baseline("naive_imaging.py", source, root)
        record_naive(result, wall_s, cpu_s, n_images, UNIT)
        return pd.read_csv(root / "result.csv")


def run_imaging(opts: BenchOptions) -> SectionResult:
    result = SectionResult("imaging")
    source = image_files(opts.cache, opts.images)
    result.add(UNIT, opts.images)
    measures = {
        "medbatch_wall_s": functools.partial(run_service, opts, source),
        "naive_wall_s": functools.partial(run_naive, source, opts.images),
    }
    values = best_of_each(opts.short_repeat, measures, result)
    ours, theirs = values["medbatch_wall_s"], values["naive_wall_s"]
    record_speedup(result, "medbatch", SPEEDUP_TARGET)
    same_keys, worst = compare_tables(ours, theirs, "source", STATS)
    result.add("max_rel_error", worst)
    result.check("same images as naive", same_keys)
    result.check("statistics within 1e-9 of naive", worst <= 1e-9)
    return result

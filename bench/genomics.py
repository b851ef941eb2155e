"""Genomics throughput: wide expression tables through `medbatch run --once` (kind "genomics")
side by side with the plain pandas script (read, melt, concat, groupby gene); per-gene n, mean,
std and sample counts must agree."""

from __future__ import annotations

import functools
from pathlib import Path

import pandas as pd

from bench.baseline import compare_tables, run_baseline
from bench.datasets import copy_into, genomics_files
from bench.options import BenchOptions
from bench.section import SectionResult, best_of_each
from bench.service import ServiceTree, run_once, temp_root
from bench.throughput import record_naive, record_run, record_speedup

ONCE_TIMEOUT_S = 900
TEXT_GENES = {"gene": str}
UNIT = "cells"
SPEEDUP_TARGET = 3.0  # issue 13: genomics >= 3x the naive script


def pipeline(opts: BenchOptions) -> dict[str, object]:
    return {
        "name": "genomics",
        "kind": "genomics",
        "priority": 4,
        "max_files": opts.genomics_max_files,
        "max_bytes": 256 * 1024**2,
        "max_wait": 120,
        "settle_s": 0,
        "gene_column": "gene",
    }


def read_result(path: Path) -> pd.DataFrame:
    return pd.read_csv(path, dtype=TEXT_GENES, keep_default_na=False, na_values=[""])


def merged_result(frames: list[pd.DataFrame]) -> pd.DataFrame:
    """Batches' per-gene (n, mean, std, samples) combined exactly (Chan et al.): M2 = std² (n-1)."""
    table = pd.concat(frames, ignore_index=True)
    table["m2"] = (table["std"].fillna(0.0) ** 2) * (table["n"] - 1)
    table["sum"] = table["mean"] * table["n"]
    grouped = table.groupby("gene", sort=True)
    totals = grouped[["n", "sum", "m2", "samples"]].sum()
    totals["mean"] = totals["sum"] / totals["n"]
    spread = table["n"] * (table["mean"] - table["gene"].map(totals["mean"])) ** 2
    totals["m2"] += spread.groupby(table["gene"]).sum()
    totals["std"] = (totals["m2"] / (totals["n"] - 1)).pow(0.5).where(totals["n"] >= 2)
    return totals.reset_index()[["gene", "n", "mean", "std", "samples"]]


def run_service(
    opts: BenchOptions, source: Path, cells: int, result: SectionResult
) -> pd.DataFrame:
    with temp_root("genomics") as root:
        tree = ServiceTree(root, [pipeline(opts)], workers={"count": opts.workers})
        n_bytes = copy_into(source, tree.inbox("genomics"))
        result.add("input_mib", round(n_bytes / 2**20, 1), "MiB")
        run = run_once(tree, ONCE_TIMEOUT_S)
        record_run(result, "medbatch", run, cells, UNIT, opts.workers)
        folders = tree.published("genomics")
        result.add("medbatch_batches", len(folders))
        return merged_result([read_result(p / "result.csv") for p in folders])


def run_naive(source: Path, cells: int, result: SectionResult) -> pd.DataFrame:
    with temp_root("genomics-naive") as root:
        wall_s, cpu_s = run_baseline("naive_genomics.py", source, root / "naive.csv")
        record_naive(result, wall_s, cpu_s, cells, UNIT)
        return read_result(root / "naive.csv")


def run_genomics(opts: BenchOptions) -> SectionResult:
    result = SectionResult("genomics")
    source = genomics_files(
        opts.cache, opts.genomics_files, opts.genomics_genes, opts.genomics_samples
    )
    cells = opts.genomics_files * opts.genomics_genes * opts.genomics_samples
    result.add("files", opts.genomics_files)
    result.add("value_cells", cells)
    measures = {
        "medbatch_wall_s": functools.partial(run_service, opts, source, cells),
        "naive_wall_s": functools.partial(run_naive, source, cells),
    }
    values = best_of_each(opts.short_repeat, measures, result)
    ours, theirs = values["medbatch_wall_s"], values["naive_wall_s"]
    record_speedup(result, "medbatch", SPEEDUP_TARGET)
    same_keys, worst = compare_tables(ours, theirs, "gene", ["mean", "std"])
    counts_equal = same_keys and bool(
        (
            ours.set_index("gene")[["n", "samples"]].sort_index()
            == theirs.set_index("gene")[["n", "samples"]].sort_index()
        ).all(axis=None)
    )
    result.add("max_rel_error", worst)
    result.check("same genes (byte-exact IDs) as naive", same_keys)
    result.check("n and samples equal naive", counts_equal)
    result.check("mean and std within 1e-9 of naive", worst <= 1e-9)
    return result

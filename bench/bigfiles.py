"""Big files: a few large EMR exports through `run --once`, as many batches (`max_bytes`) and as
ONE batch, next to the naive and polars scripts; peak RSS of every worker, and whether one
batch of big files kept every core busy."""

from __future__ import annotations

import functools
import json
from pathlib import Path
from typing import Any

import pandas as pd

from bench.datasets import big_emr_files, copy_into
from bench.emr import check_against_naive as check_result
from bench.emr import merged_result, run_naive, run_polars
from bench.options import BenchOptions
from bench.section import SectionResult, best_of
from bench.service import ServiceTree, run_once, temp_root
from bench.throughput import record_memory, record_run, record_speedup

ONCE_TIMEOUT_S = 1800
SPEEDUP_TARGET = 2.0  # issue 13: big files >= 2x naive
WORKER_PEAK_TARGET_MIB = 500.0  # ... with every worker under a fixed bound
CORES_TARGET = 1.5  # one batch of big files: workers' CPU seconds per wall second
UNIT = "files"
LAYOUTS = ("batches", "one_batch")


def pipeline(opts: BenchOptions, layout: str) -> dict[str, Any]:
    one_batch = layout == "one_batch"
    return {
        "name": "emr",
        "kind": "emr",
        "priority": 2,
        "max_files": opts.big_files if one_batch else 1000,
        "max_bytes": 64 * 2**30 if one_batch else opts.big_max_bytes_mib * 2**20,
        "max_wait": 30,
        "settle_s": 0,
        "group_by": "diagnosis",
        "after_publish": "archive",
        # A 250 MB export has ~6 M rows, over the default hostile-input bound of 5 M.
        "max_rows": 100_000_000,
    }


def run_layout(
    opts: BenchOptions, source: Path, layout: str, result: SectionResult
) -> pd.DataFrame:
    with temp_root(f"big-{layout}") as root:
        tree = ServiceTree(root, [pipeline(opts, layout)], workers={"count": opts.workers})
        copy_into(source, tree.inbox("emr"))
        run = run_once(tree, ONCE_TIMEOUT_S)
        record_run(result, layout, run, opts.big_files, UNIT, opts.workers)
        record_memory(result, f"{layout}_", run)
        result.add(f"{layout}_batches", len(tree.published("emr")))
        workers = run.workers
        peak = max((w.peak_rss_mib for w in workers), default=None)
        # Both cores: the workers' CPU while batches ran (first claim → last publish, worker
        # start-up excluded) over that window's length.
        if run.first_received_at is not None and run.last_published_at is not None:
            start, end = run.first_received_at, run.last_published_at
            window = max(end - start, 1e-3)
            busy = [w.cpu_s_between(start, end) for w in workers]
            cores = sum(busy) / window
            result.add(f"{layout}_workers_cpu_per_wall_s", round(cores, 2), "cores")
            shares = " / ".join(f"{100 * b / window:.0f}" for b in busy)
            result.add(f"{layout}_each_worker_busy_pct", shares, "%")
        result.check(f"{layout}: every file published", _published(tree) == opts.big_files)
        result.check(f"{layout}: nothing quarantined", tree.quarantined() == 0)
        result.check(f"{layout}: worker peak sampled", peak is not None)
        if not tree.published("emr"):
            raise RuntimeError(f"nothing published; quarantined: {_reasons(tree)}")
        return merged_result(tree)


def _reasons(tree: ServiceTree) -> str:
    errors = (tree.root / "quarantine").glob("*/*.error.json")
    return ", ".join(sorted({json.loads(p.read_text()).get("reason", "?") for p in errors}))


def _published(tree: ServiceTree) -> int:
    return sum(len(m["inputs"]) for m in tree.manifests("emr"))


def run_bigfiles(opts: BenchOptions) -> SectionResult:
    result = SectionResult("bigfiles")
    source = big_emr_files(opts.cache, opts.big_files, opts.big_file_mib)
    result.add("files", opts.big_files)
    result.add("file_mib", opts.big_file_mib, "MiB")
    result.add("max_bytes_mib", opts.big_max_bytes_mib, "MiB")
    naive = best_of(
        opts.repeat, functools.partial(run_naive, source, opts.big_files), result, "naive_wall_s"
    )
    measure_polars = functools.partial(run_polars, source, opts.big_files)
    polars = best_of(opts.repeat, measure_polars, result, "polars_wall_s")
    check_result(result, "polars", polars, naive)
    for layout in LAYOUTS:
        try:
            measure = functools.partial(run_layout, opts, source, layout)
            ours = best_of(opts.repeat, measure, result, f"{layout}_wall_s")
        except Exception as exc:
            result.notes.append(f"{layout} failed: {type(exc).__name__}: {exc}"[:600])
            result.check(f"{layout}: run --once succeeded", False)
            continue
        check_result(result, layout, ours, naive)
        record_speedup(result, layout, SPEEDUP_TARGET if layout == "batches" else None, None)
        result.target(f"{layout}_worker_peak_rss_mib", "<=", WORKER_PEAK_TARGET_MIB)
    result.target("one_batch_workers_cpu_per_wall_s", ">=", CORES_TARGET)
    return result

"""Scale: a backlog of small EMR files already in the inbox when `run --once` starts (time to
READY, main-process peak RSS, files/s), and how that grows from 1k to 100k files."""

from __future__ import annotations

from bench.datasets import copy_into, emr_files
from bench.emr import pipeline
from bench.options import BenchOptions
from bench.section import SectionResult
from bench.service import ServiceTree, run_once, temp_root

ONCE_TIMEOUT_S = 1800
FLAT_RATIO_TARGET = 1.5  # largest backlog vs smallest: per-file time and main RSS stay flat


def run_backlog(opts: BenchOptions, n_files: int, result: SectionResult) -> None:
    source = emr_files(opts.cache, n_files, opts.emr_rows)
    key = f"n{n_files}"
    with temp_root(f"scale-{n_files}") as root:
        tree = ServiceTree(root, [pipeline(opts)], workers={"count": opts.workers})
        copy_into(source, tree.inbox("emr"))
        run = run_once(tree, ONCE_TIMEOUT_S)
        published = sum(len(m["inputs"]) for m in tree.manifests("emr"))
    result.check(f"{key}: every file published", published == n_files)
    result.add(f"{key}_wall_s", round(run.wall_s, 2), "s")
    if run.startup_s is not None:
        result.add(f"{key}_time_to_ready_s", round(run.startup_s, 3), "s")
    result.add(f"{key}_files_per_s", round(n_files / run.wall_s, 1), "files/s")
    result.add(f"{key}_ms_per_file", round(1000 * run.wall_s / n_files, 3), "ms")
    if run.steady_s is not None:
        result.add(f"{key}_steady_ms_per_file", round(1000 * run.steady_s / n_files, 3), "ms")
    if run.main_peak_rss_mib is not None:
        result.add(f"{key}_main_peak_rss_mib", run.main_peak_rss_mib, "MiB")
    result.add(f"{key}_main_cpu_ms_per_file", round(1000 * run.main_cpu_s / n_files, 3), "ms")


def _ratio(result: SectionResult, small: int, large: int, figure: str) -> float | None:
    a, b = result.figures.get(f"n{small}_{figure}"), result.figures.get(f"n{large}_{figure}")
    if not isinstance(a, float | int) or not isinstance(b, float | int) or a <= 0:
        return None
    return round(b / a, 2)


def run_scale(opts: BenchOptions) -> SectionResult:
    result = SectionResult("scale")
    sizes = sorted({*opts.scale_growth, opts.scale_backlog})
    for n_files in sizes:
        print(f"   scale: {n_files} files", flush=True)
        run_backlog(opts, n_files, result)
    small, large = sizes[0], sizes[-1]
    for figure in ("steady_ms_per_file", "main_peak_rss_mib"):
        ratio = _ratio(result, small, large, figure)
        name = f"growth_{figure}_n{large}_over_n{small}"
        result.add(name, ratio, "x")
        result.target(name, "<=", FLAT_RATIO_TARGET)
    return result

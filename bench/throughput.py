"""The figures every throughput section reports the same way: medbatch's `run --once` (wall,
start-up, steady state, CPU of the main process and of the workers), the plain script's, and
the ratio."""

from __future__ import annotations

from bench.baseline import ScriptRun
from bench.section import SectionResult
from bench.service import OnceRun


def record_run(
    result: SectionResult, prefix: str, run: OnceRun, count: int, unit: str, workers: int
) -> None:
    """`count` items of `unit` (files, images, cells) went through in `run` on `workers`."""
    result.add(f"{prefix}_wall_s", round(run.wall_s, 3), "s")
    result.add(f"{prefix}_{unit}_per_s", _rate(count, run.wall_s), f"{unit}/s")
    for phase, seconds in (
        ("startup", run.startup_s),
        ("claim", run.claim_s),
        ("steady", run.steady_s),
        ("shutdown", run.shutdown_s),
    ):
        if seconds is not None:
            result.add(f"{prefix}_{phase}_s", round(seconds, 3), "s")
    if run.steady_s is not None:
        result.add(f"{prefix}_steady_{unit}_per_s", _rate(count, run.steady_s), f"{unit}/s")
    if run.batch_seconds is not None:
        # Batches in flight (started → published, commit included) over what `workers` slots
        # could have held from the first start to the last publish: low means a starved pool.
        in_flight_s, window_s = run.batch_seconds
        occupancy = round(100 * in_flight_s / (workers * window_s), 1)
        result.add(f"{prefix}_worker_slots_busy_pct", occupancy, "%")
    result.add(f"{prefix}_main_cpu_s", round(run.main_cpu_s, 2), "s")
    # Every other process: pool workers, the claimer, the fork server (each below).
    result.add(f"{prefix}_workers_cpu_s", round(run.workers_cpu_s, 2), "s")


def record_naive(result: SectionResult, wall_s: float, cpu_s: float, count: int, unit: str) -> None:
    result.add("naive_wall_s", round(wall_s, 3), "s")
    result.add(f"naive_{unit}_per_s", _rate(count, wall_s), f"{unit}/s")
    result.add("naive_cpu_s", round(cpu_s, 2), "s")


def record_polars(result: SectionResult, run: ScriptRun, count: int, unit: str) -> None:
    result.add("polars_wall_s", round(run.wall_s, 3), "s")
    result.add(f"polars_{unit}_per_s", _rate(count, run.wall_s), f"{unit}/s")
    result.add("polars_cpu_s", round(run.cpu_s, 2), "s")
    result.add("polars_peak_rss_mib", run.peak_rss_mib, "MiB")


def record_memory(result: SectionResult, prefix: str, run: OnceRun) -> None:
    """Peak RSS (VmHWM) of the main process and of the largest worker, and each worker's CPU."""
    if run.main_peak_rss_mib is not None:
        result.add(f"{prefix}main_peak_rss_mib", run.main_peak_rss_mib, "MiB")
    workers = run.workers
    if workers:
        result.add(f"{prefix}worker_peak_rss_mib", max(w.peak_rss_mib for w in workers), "MiB")
        result.add(f"{prefix}worker_cpu_s", " / ".join(f"{w.cpu_s:.1f}" for w in workers), "s")
    for name in ("claimer", "mover", "helper"):
        if named := [p for p in run.processes if p.role == name]:
            result.add(f"{prefix}{name}_cpu_s", round(sum(p.cpu_s for p in named), 2), "s")


def record_speedup(
    result: SectionResult,
    prefix: str,
    target: float | None = None,
    vs_polars_target: float | None = None,
) -> None:
    """medbatch's wall-clock rate over the plain script's, and over polars' if it ran (all end
    to end, whole processes)."""
    ours = result.figures.get(f"{prefix}_wall_s")
    for baseline, goal, name in (
        ("naive", target, f"{prefix}_speedup"),
        ("polars", vs_polars_target, f"{prefix}_vs_polars"),
    ):
        theirs = result.figures.get(f"{baseline}_wall_s")
        if not isinstance(ours, float) or not isinstance(theirs, float):
            continue
        result.add(name, round(theirs / ours, 2), "x")
        if goal is not None:
            result.target(name, ">=", goal)


def _rate(count: int, seconds: float) -> float:
    rate = count / max(seconds, 1e-9)
    return round(rate, 1) if rate < 10_000 else float(round(rate))

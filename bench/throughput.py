"""The figures every throughput section reports the same way: medbatch's `run --once` (wall,
start-up, steady state, CPU of the main process and of the workers), the plain script's, and
the ratio."""

from __future__ import annotations

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
    result.add(f"{prefix}_workers_cpu_s", round(run.workers_cpu_s, 2), "s")


def record_naive(result: SectionResult, wall_s: float, cpu_s: float, count: int, unit: str) -> None:
    result.add("naive_wall_s", round(wall_s, 3), "s")
    result.add(f"naive_{unit}_per_s", _rate(count, wall_s), f"{unit}/s")
    result.add("naive_cpu_s", round(cpu_s, 2), "s")


def record_speedup(result: SectionResult, prefix: str, target: float | None = None) -> None:
    """medbatch's wall-clock rate over the plain script's (both end to end)."""
    ours, theirs = result.figures.get(f"{prefix}_wall_s"), result.figures.get("naive_wall_s")
    if not isinstance(ours, float) or not isinstance(theirs, float):
        return
    result.add(f"{prefix}_speedup", round(theirs / ours, 2), "x")
    if target is not None:
        result.target(f"{prefix}_speedup", ">=", target)


def _rate(count: int, seconds: float) -> float:
    rate = count / max(seconds, 1e-9)
    return round(rate, 1) if rate < 10_000 else float(round(rate))

"""The plain single-process scripts medbatch is compared with, run as subprocesses and timed from
process start to exit, as the service is; and the comparison of their results."""

from __future__ import annotations

import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd

from bench.options import BENCH


def run_baseline(script: str, *args: str | Path, timeout_s: float = 900) -> tuple[float, float]:
    """Run `bench/<script>` with this interpreter; return its (wall-clock, CPU) seconds."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    started = time.perf_counter()
    done = subprocess.run(
        [sys.executable, str(BENCH / script), *map(str, args)],
        capture_output=True,
        text=True,
        timeout=timeout_s,
        check=False,
    )
    seconds = time.perf_counter() - started
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if done.returncode != 0:
        raise RuntimeError(f"{script} exited {done.returncode}: {done.stderr.strip()[-500:]}")
    cpu_s = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return seconds, cpu_s


def max_relative_error(ours: pd.Series, theirs: pd.Series) -> float:
    """Largest |a - b| / max(|a|, |b|) over aligned values; NaN on both sides counts as equal."""
    a = ours.to_numpy(dtype=np.float64)
    b = theirs.to_numpy(dtype=np.float64)
    both_nan = np.isnan(a) & np.isnan(b)
    scale = np.maximum(np.abs(a), np.abs(b))
    diff = np.abs(a - b)
    error = np.divide(diff, scale, out=np.zeros_like(diff), where=scale > 0)
    error[both_nan] = 0.0
    error[np.isnan(error)] = np.inf  # NaN on one side only
    return float(error.max()) if len(error) else 0.0


def compare_tables(
    ours: pd.DataFrame, theirs: pd.DataFrame, key: str, columns: list[str]
) -> tuple[bool, float]:
    """Same keys and (exact) counts, and the worst relative error over `columns`."""
    ours, theirs = ours.set_index(key).sort_index(), theirs.set_index(key).sort_index()
    if not ours.index.equals(theirs.index):
        return False, float("inf")
    worst = max((max_relative_error(ours[c], theirs[c]) for c in columns), default=0.0)
    return True, worst

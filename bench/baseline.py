"""The plain single-process scripts medbatch is compared with, run as subprocesses and timed from
process start to exit, as the service is; and the comparison of their results."""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from bench.options import BENCH
from daemon.executors.spawning import WORKER_ENVIRONMENT


@dataclass(frozen=True)
class ScriptRun:
    wall_s: float
    cpu_s: float
    peak_rss_mib: float  # the script's own VmHWM (ru_maxrss of exactly that child)


def run_script(script: str, *args: str | Path, timeout_s: float = 900) -> ScriptRun:
    """Run `bench/<script>` with this interpreter; its wall-clock and CPU seconds and peak RSS.
    An input folder is read once first: medbatch's side reads files just copied into its inbox
    (in the page cache), so the script must not pay for a disk the other side never waited on."""
    for arg in args:
        if Path(arg).is_dir():
            _read_through(Path(arg))
    started = time.perf_counter()
    # stderr to a file, not a pipe: nothing reads a pipe while we wait.
    with (
        tempfile.TemporaryFile() as errors,
        subprocess.Popen(
            [sys.executable, str(BENCH / script), *map(str, args)],
            stdout=subprocess.DEVNULL,
            stderr=errors,
            # Like for like: the NumPy setting medbatch's workers run with (no huge-page
            # requests, whose inline compaction slows both sides on a fragmented host).
            env={**os.environ, **WORKER_ENVIRONMENT},
        ) as process,
    ):
        timer = threading.Timer(timeout_s, process.kill)
        timer.start()
        try:
            # wait4: the rusage of this child alone, not of every child this bench reaped.
            _, status, usage = os.wait4(process.pid, 0)
        finally:
            timer.cancel()
        seconds = time.perf_counter() - started
        process.returncode = os.waitstatus_to_exitcode(status)
        errors.seek(0)
        stderr = errors.read().decode(errors="replace")
    if process.returncode != 0:
        raise RuntimeError(f"{script} exited {process.returncode}: {stderr.strip()[-500:]}")
    return ScriptRun(seconds, usage.ru_utime + usage.ru_stime, round(usage.ru_maxrss / 1024, 1))


def _read_through(folder: Path) -> None:
    for path in folder.iterdir():
        if path.is_file():
            with path.open("rb") as fh:
                while fh.read(8 << 20):
                    pass


def run_baseline(script: str, *args: str | Path, timeout_s: float = 900) -> tuple[float, float]:
    """Run `bench/<script>` with this interpreter; return its (wall-clock, CPU) seconds."""
    run = run_script(script, *args, timeout_s=timeout_s)
    return run.wall_s, run.cpu_s


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

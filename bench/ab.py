"""Two versions of the service side by side: `run --once` on N small EMR files, alternating
between another checkout of the repository and this one (the machine drifts, so runs pair up).

    git worktree add /tmp/before <commit>
    python -m bench.ab /tmp/before [--pairs 5] [--files 20000]

Both run with this checkout's interpreter and libraries: `python -m daemon` from the other
checkout's folder imports its `daemon` package first. Prints each run's wall and the CPU
seconds of each role (main, claimer, workers, helpers: on two cores a backlog is bound by their
sum, which drifts less than the wall), and the medians of both sides.
"""

from __future__ import annotations

import argparse
import compileall
import statistics
import time
from pathlib import Path

import bench.service
from bench.datasets import copy_into, emr_files
from bench.emr import pipeline
from bench.options import BenchOptions
from bench.service import ServiceTree, run_once, temp_root

THIS = bench.service.REPO
ROLES = ("main", "claimer", "mover", "worker", "helper")


def once(checkout: Path, opts: BenchOptions, source: Path) -> dict[str, float]:
    """wall, then the CPU seconds of each role and of all (`all`)."""
    bench.service.REPO = checkout
    try:
        with temp_root("ab") as root:
            tree = ServiceTree(root, [pipeline(opts)], workers={"count": opts.workers})
            copy_into(source, tree.inbox("emr"))
            time.sleep(1)  # the copies' writeback settles before the clock starts
            run = run_once(tree, 900)
    finally:
        bench.service.REPO = THIS
    figures = {"wall": run.wall_s}
    for role in ROLES:
        figures[role] = sum(p.cpu_s for p in run.processes if p.role == role)
    figures["all"] = sum(figures[role] for role in ROLES)
    return figures


def _line(side: str, figures: dict[str, float]) -> str:
    cpu = "  ".join(f"{role} {figures[role]:4.2f}" for role in (*ROLES, "all"))
    return f"{side:6} wall {figures['wall']:5.2f} s  CPU s: {cpu}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("before", type=Path, help="the other checkout (e.g. a git worktree)")
    parser.add_argument("--pairs", type=int, default=5)
    parser.add_argument("--files", type=int, default=20_000)
    args = parser.parse_args()
    opts = BenchOptions()
    source = emr_files(opts.cache, args.files, opts.emr_rows)
    for checkout in (args.before, THIS):  # neither side compiles its modules on the clock
        compileall.compile_dir(checkout / "daemon", quiet=1)
    runs: dict[str, list[dict[str, float]]] = {"before": [], "this": []}
    for _ in range(args.pairs):
        for side, checkout in (("before", args.before.resolve()), ("this", THIS)):
            runs[side].append(once(checkout, opts, source))
            print(_line(side, runs[side][-1]), flush=True)
    for side, figures in runs.items():
        medians = {key: statistics.median(f[key] for f in figures) for key in figures[0]}
        print(_line(f"{side}", medians).replace("wall", "median wall", 1))


if __name__ == "__main__":
    main()

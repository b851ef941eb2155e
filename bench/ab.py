"""Two versions of the service side by side: `run --once` on N small EMR files, alternating
between another checkout of the repository and this one (the machine drifts, so runs pair up).

    git worktree add /tmp/before <commit>
    python -m bench.ab /tmp/before [--pairs 5] [--files 20000]

Both run with this checkout's interpreter and libraries: `python -m daemon` from the other
checkout's folder imports its `daemon` package first. Prints each run's wall and main-process
CPU, and the medians.
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


def once(checkout: Path, opts: BenchOptions, source: Path) -> tuple[float, float]:
    bench.service.REPO = checkout
    try:
        with temp_root("ab") as root:
            tree = ServiceTree(root, [pipeline(opts)], workers={"count": opts.workers})
            copy_into(source, tree.inbox("emr"))
            time.sleep(1)  # the copies' writeback settles before the clock starts
            run = run_once(tree, 900)
            return run.wall_s, run.main_cpu_s
    finally:
        bench.service.REPO = THIS


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
    walls: dict[str, list[float]] = {"before": [], "this": []}
    for _ in range(args.pairs):
        for side, checkout in (("before", args.before.resolve()), ("this", THIS)):
            wall, main_cpu = once(checkout, opts, source)
            walls[side].append(wall)
            print(f"{side:6} wall {wall:5.2f} s  main CPU {main_cpu:5.2f} s", flush=True)
    for side, values in walls.items():
        print(f"{side:6} median wall {statistics.median(values):.2f} s over {len(values)} runs")


if __name__ == "__main__":
    main()

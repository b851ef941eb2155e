"""`python -m bench [--quick] [--only SECTION ...] [--executor process|dask|both] [--profile]`.

Runs each chosen section in turn (a failing one is reported, the rest still run), prints one
summary table and writes it to bench/results/latest.json. Exit status 1 if a target or check was
missed.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time
import traceback
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path

from bench.bigfiles import run_bigfiles
from bench.emr import run_emr
from bench.genomics import run_genomics
from bench.idle import run_idle
from bench.imaging import run_imaging
from bench.latency import run_latency
from bench.options import RESULTS, BenchOptions
from bench.report import MachineLoad, render_table, write_json
from bench.scale import run_scale
from bench.section import SectionResult

SECTIONS: dict[str, Callable[[BenchOptions], SectionResult]] = {
    "emr": run_emr,
    "bigfiles": run_bigfiles,
    "scale": run_scale,
    "latency": run_latency,
    "idle": run_idle,
    "imaging": run_imaging,
    "genomics": run_genomics,
}
EXECUTORS = {"process": ("process",), "dask": ("dask",), "both": ("process", "dask")}


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    parser.add_argument(
        "--only", action="append", choices=list(SECTIONS), help="run only this section (repeat)"
    )
    parser.add_argument("--quick", action="store_true", help="small sizes: a smoke run")
    parser.add_argument(
        "--executor",
        choices=list(EXECUTORS),
        default="both",
        help="executor(s) for the EMR throughput section (default: both, side by side)",
    )
    parser.add_argument(
        "--profile",
        action="store_true",
        help="after the EMR figures, one more EMR run under py-spy; print where the time goes",
    )
    parser.add_argument("--cache", type=Path, default=RESULTS / "cache", help="input data cache")
    parser.add_argument("--results", type=Path, default=RESULTS, help="output folder")
    parser.add_argument("--workers", type=int, default=2, help="[workers] count of the service")
    parser.add_argument(
        "--repeat",
        type=int,
        default=None,
        help="throughput sections: run each side N times, keep the fastest (a busy machine); "
        "default 1, and 3 (sides in turn) for the small-file EMR, imaging and genomics sections",
    )
    return parser


def options_from(args: argparse.Namespace) -> BenchOptions:
    opts = BenchOptions(
        cache=args.cache,
        results=args.results,
        executors=EXECUTORS[args.executor],
        workers=args.workers,
        profile=args.profile,
    )
    opts = opts.quick_sized() if args.quick else opts
    if args.repeat is not None:
        opts = dataclasses.replace(opts, repeat=args.repeat, short_repeat=args.repeat)
    return opts


def run_section(name: str, opts: BenchOptions) -> SectionResult:
    print(f"== {name} ...", flush=True)
    started, load = time.perf_counter(), MachineLoad.now()
    try:
        result = SECTIONS[name](opts)
    except Exception as exc:
        traceback.print_exc()
        result = SectionResult(name, error=f"{type(exc).__name__}: {exc}")
    # Other work on the machine skews every figure: say how busy it was.
    result.add("machine_busy_pct", round(load.busy_pct_since(), 1), "%")
    result.add("loadavg_1m_at_start", load.loadavg_1m)
    for note in result.notes:
        print(note)
    print(f"== {name} done in {time.perf_counter() - started:.1f} s", flush=True)
    return result


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = _parser().parse_args(argv)
    opts = options_from(args)
    started = time.perf_counter()
    results = [run_section(name, opts) for name in args.only or SECTIONS]
    print()
    print(render_table(results))
    output = opts.results / "latest.json"
    options = {k: str(v) if isinstance(v, Path) else v for k, v in asdict(opts).items()}
    write_json(results, output, argv, options, time.perf_counter() - started)
    print(f"\nwritten to {output} ({time.perf_counter() - started:.0f} s in all)")
    return 0 if all(r.is_ok for r in results) else 1


if __name__ == "__main__":
    raise SystemExit(main())

"""Where `medbatch run --once` spends its main process's time on N small EMR files.

    python -m bench.profile_once [--files 20000] [--tool cprofile|py-spy] [--out DIR]

cProfile (main thread: the loop that owns journal, audit and archive) prints the medbatch
steps with call counts and cumulative seconds; py-spy samples every process and thread.
"""

from __future__ import annotations

import argparse
import pstats
import sys
from pathlib import Path
from typing import Any

from bench.datasets import copy_into, emr_files
from bench.emr import pipeline
from bench.options import RESULTS, BenchOptions
from bench.profiling import py_spy_command, summarise_profile
from bench.service import ServiceTree, run_once, temp_root

_SQL = "<method '{}' of 'sqlite3.Connection' objects>"
# (step, cProfile function-name suffixes that make it up); cumulative time, so steps nest.
STEPS = (
    ("start-up (journal, pool, watches)", ("service.py:_start",)),
    ("start-up scan of the inboxes", ("intake.py:scan",)),
    ("claim (move, hash, journal rows)", ("intake.py:_claim",)),
    ("  move into the spool + hash", ("intake.py:_move_and_hash",)),
    ("  journal: begin/finish claims", ("journal.py:begin_claims", "journal.py:finish_claims")),
    ("admit to batches", ("admission.py:admit",)),
    ("seal (journal + audit)", ("batch_flow.py:seal",)),
    ("dispatch", ("batch_flow.py:dispatch",)),
    ("result handling (commit)", ("batch_flow.py:on_done",)),
    ("  journal: mark_published", ("journal.py:mark_published",)),
    ("archive renames (dispose)", ("disposal.py:dispose",)),
    ("audit lines (all)", ("writer.py:record",)),
    ("  audit fsync", ("writer.py:sync",)),
    ("journal transactions (all)", ("journal.py:transaction",)),
    ("sqlite execute/executemany (all)", (_SQL.format("execute"), _SQL.format("executemany"))),
    ("os.rename (all)", ("<built-in method posix.rename>",)),
    ("os.fsync (all)", ("<built-in method posix.fsync>",)),
    ("os.lstat (all)", ("<built-in method posix.lstat>",)),
    ("pathlib Path / name (all)", ("pathlib.py:__truediv__",)),
    ("json encode (all)", ("encoder.py:encode",)),
    ("waiting for messages", ("service.py:_wait_and_handle",)),
    ("shutdown (drain, pool)", ("service.py:_stop",)),
)


class ProfiledTree(ServiceTree):
    """The service command under cProfile (`python -m cProfile -o OUT -m daemon ...`)."""

    def __init__(
        self, root: Path, pipelines: list[dict[str, Any]], stats_path: Path, **sections: Any
    ) -> None:
        self.stats_path = stats_path
        super().__init__(root, pipelines, **sections)

    def command(self, *args: str) -> list[str]:
        profiled = [sys.executable, "-m", "cProfile", "-o", str(self.stats_path), "-m", "daemon"]
        return [*profiled, *args, "--config", str(self.config)]


def _name(key: tuple[str, int, str]) -> str:
    filename, _, function = key
    return f"{Path(filename).name}:{function}" if filename != "~" else function


def step_table(stats_path: Path) -> list[str]:
    stats = pstats.Stats(str(stats_path))
    raw = stats.stats  # type: ignore[attr-defined]
    rows = [f"{'step':38} {'calls':>9} {'cum s':>8} {'own s':>8}"]
    for step, names in STEPS:
        calls = cum = own = 0.0
        for key, (_, ncalls, tottime, cumtime, _) in raw.items():
            if _name(key) in names:
                calls, cum, own = calls + ncalls, cum + cumtime, own + tottime
        rows.append(f"{step:38} {int(calls):9d} {cum:8.2f} {own:8.2f}")
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.profile_once", description=__doc__)
    parser.add_argument("--files", type=int, default=20000)
    parser.add_argument("--tool", choices=("cprofile", "py-spy"), default="cprofile")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    opts = BenchOptions()
    source = emr_files(opts.cache, args.files, opts.emr_rows)
    out = args.out / f"once-{args.files}.{'prof' if args.tool == 'cprofile' else 'pyspy.txt'}"
    out.parent.mkdir(parents=True, exist_ok=True)
    with temp_root("profile") as root:
        if args.tool == "cprofile":
            workers = {"count": opts.workers}
            tree: ServiceTree = ProfiledTree(root, [pipeline(opts)], out, workers=workers)
            wrapper: list[str] = []
        else:
            tree = ServiceTree(root, [pipeline(opts)], workers={"count": opts.workers})
            wrapper = py_spy_command(out)
        copy_into(source, tree.inbox("emr"))
        run = run_once(tree, 1800, wrapper=wrapper)
    cpu = f"main CPU {run.main_cpu_s:.2f} s, workers {run.workers_cpu_s:.2f} s"
    print(f"{args.files} files: wall {run.wall_s:.2f} s, {cpu} ({args.tool} overhead included)")
    lines = step_table(out) if args.tool == "cprofile" else summarise_profile(out, "run --once")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

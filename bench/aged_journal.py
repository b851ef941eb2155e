"""What a journal's age costs: `run --once` on N small EMR files, with a fresh journal and with one
already holding ROWS finished files (a service some weeks in, before retention forgets them).

    python -m bench.aged_journal [--rows 500000] [--files 20000] [--runs 2]

The old rows are written straight into the journal (published, archived, a day old) with the
audit head recorded after them, as a service that ran cleanly leaves it; then the same files go
through the real service. Prints seconds and main-process CPU per file for both, runs
alternated (the machine drifts).
"""

from __future__ import annotations

import argparse
import hashlib
import sqlite3
import statistics
import time
from pathlib import Path

from bench.datasets import copy_into, emr_files
from bench.emr import pipeline
from bench.options import BenchOptions
from bench.service import ServiceTree, run_once, temp_root
from daemon.journal import Journal

BATCH = 500
_ROW = (
    "INSERT INTO files (pipeline, name, spool_name, sha256, size, received_at, state, batch_id, "
    "facts, done_at, disposed) VALUES ('emr', ?, ?, ?, 1500, ?, 'published', ?, ?, ?, 1)"
)
_BATCH_ROW = (
    "INSERT INTO batches (id, pipeline, priority, state, opened_at, sealed_at, n_files, "
    "n_bytes, finished_at) VALUES (?, 'emr', 2, 'published', ?, ?, ?, ?, ?)"
)


def age(journal_path: Path, rows: int) -> None:
    """`rows` finished files (distinct contents) in batches of 500, a day old."""
    Journal(journal_path).set_meta(audit_head_at=time.time())  # the schema, and a clean head
    then = time.time() - 86400
    facts = '{"rows": 50, "kept": 45, "groups": 5}'
    db = sqlite3.connect(journal_path, isolation_level=None)
    try:
        db.execute("BEGIN")
        for b in range(0, rows, BATCH):
            batch_id = f"aged-{b:09d}"
            n = min(BATCH, rows - b)
            db.execute(_BATCH_ROW, (batch_id, then, then, n, n * 1500, then))
            db.executemany(
                _ROW,
                [
                    (f"old-{i}.csv", f"emr/aged-{i:09d}.csv",
                     hashlib.sha256(b"aged %d" % i).hexdigest(), then, batch_id, facts, then)
                    for i in range(b, b + n)
                ],
            )  # fmt: skip
        db.execute("COMMIT")
        db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    finally:
        db.close()


def once(opts: BenchOptions, source: Path, rows: int) -> tuple[float, float]:
    """(wall s, main CPU s) of one `run --once`."""
    with temp_root("aged") as root:
        tree = ServiceTree(root, [pipeline(opts)], workers={"count": opts.workers})
        if rows:
            age(root / "state" / "journal.db", rows)
        copy_into(source, tree.inbox("emr"))
        run = run_once(tree, 1800)
    return run.wall_s, run.main_cpu_s


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.aged_journal", description=__doc__)
    parser.add_argument("--rows", type=int, default=500_000)
    parser.add_argument("--files", type=int, default=20_000)
    parser.add_argument("--runs", type=int, default=2)
    args = parser.parse_args(argv)
    opts = BenchOptions()
    source = emr_files(opts.cache, args.files, opts.emr_rows)
    results: dict[int, list[tuple[float, float]]] = {0: [], args.rows: []}
    for _ in range(args.runs):
        for rows in results:
            results[rows].append(once(opts, source, rows))
    for rows, runs in results.items():
        wall = statistics.median(w for w, _ in runs)
        cpu = statistics.median(c for _, c in runs)
        per_file = f"{wall / args.files * 1e6:.0f} µs a file, main CPU {cpu:.2f} s"
        print(f"journal with {rows:>9,} old rows: wall {wall:.2f} s ({per_file})")
    fresh, aged = (statistics.median(w for w, _ in runs) for runs in results.values())
    print(f"aged / fresh: {aged / fresh:.2f}x")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""The polars baseline: one lazy `scan_csv` over every file, no bookkeeping.

    python bench/polars_emr.py INPUT_DIR OUTPUT_CSV [--group-by diagnosis]

Drops rows with any missing value, groups by `group`, sums and counts, and divides into exact
means; writes the same `group, n, mean_<column>...` table as bench/naive_emr.py.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import polars as pl

ID_COLUMNS = {"patient_id": pl.Utf8}
NUMERIC = (pl.Int64, pl.Float64, pl.Int32, pl.Float32)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("input_dir", type=Path)
    parser.add_argument("output_csv", type=Path)
    parser.add_argument("--group-by", default="diagnosis")
    args = parser.parse_args(argv)
    paths = sorted(str(p) for p in args.input_dir.iterdir() if not p.name.startswith("."))
    frame = pl.scan_csv(paths, schema_overrides=ID_COLUMNS).drop_nulls()
    schema = frame.collect_schema()
    numeric = [c for c, t in schema.items() if c != args.group_by and t in NUMERIC]
    totals = (
        frame.group_by(args.group_by)
        .agg(pl.len().alias("n"), *(pl.col(c).sum() for c in numeric))
        .collect()
    )
    means = [(pl.col(c) / pl.col("n")).alias(f"mean_{c}") for c in numeric]
    totals.select(args.group_by, "n", *means).sort(args.group_by).write_csv(args.output_csv)
    print(f"{len(paths)} files, {int(totals['n'].sum())} rows")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""The naive baseline: one process, pandas, one file at a time.

    python bench/naive_emr.py INPUT_DIR OUTPUT_CSV [--group-by diagnosis]

Per file: read_csv, dropna, groupby(group) sums and counts; at the end the per-file partials are
added up and divided into exact means. Writes `group, n, mean_<column>...` like medbatch's EMR
result.csv.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import pandas as pd

ID_COLUMNS = {"patient_id": str}


def reduce_file(path: Path, group: str) -> pd.DataFrame:
    frame = pd.read_csv(path, dtype=ID_COLUMNS).dropna()
    numeric = frame.select_dtypes("number")
    grouped = numeric.groupby(frame[group])
    partial = grouped.sum()
    partial.insert(0, "n", grouped.size())
    return partial


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("input_dir", type=Path)
    parser.add_argument("output_csv", type=Path)
    parser.add_argument("--group-by", default="diagnosis")
    args = parser.parse_args(argv)
    paths = sorted(p for p in args.input_dir.iterdir() if not p.name.startswith("."))
    partials = [reduce_file(path, args.group_by) for path in paths]
    totals = pd.concat(partials).groupby(level=0).sum()
    result = totals[["n"]].copy()
    for column in totals.columns.drop("n"):
        result[f"mean_{column}"] = totals[column] / totals["n"]
    result.sort_index().rename_axis(args.group_by).reset_index().to_csv(
        args.output_csv, index=False
    )
    print(f"{len(paths)} files, {int(totals['n'].sum())} rows")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""The plain baseline for genomics: one process, pandas: read every wide table, melt, concat,
groupby gene.

    python bench/naive_genomics.py INPUT_DIR OUTPUT_CSV [--gene-column gene]

Writes `gene, n, mean, std (sample), samples` like medbatch's genomics result.csv.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import pandas as pd


def read_long(path: Path, gene: str) -> pd.DataFrame:
    # Gene IDs stay text: only an empty cell is missing ("NA", "null" can be names).
    wide = pd.read_csv(path, dtype={gene: str}, keep_default_na=False, na_values=[""])
    return wide.melt(id_vars=gene, var_name="sample", value_name="expression")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("input_dir", type=Path)
    parser.add_argument("output_csv", type=Path)
    parser.add_argument("--gene-column", default="gene")
    args = parser.parse_args(argv)
    gene = args.gene_column
    paths = sorted(p for p in args.input_dir.iterdir() if not p.name.startswith("."))
    long = pd.concat([read_long(path, gene) for path in paths], ignore_index=True)
    long = long.dropna(subset=["expression"])
    grouped = long.groupby(gene, sort=True)
    result = grouped["expression"].agg(n="count", mean="mean", std="std")
    result["samples"] = grouped["sample"].nunique()
    result.rename_axis("gene").reset_index().to_csv(args.output_csv, index=False)
    print(f"{len(paths)} files, {len(long)} values, {len(result)} genes")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""Gene-expression tables (CSV, TSV; long or wide): per-gene count, exact mean and sample std.

Each file is reduced to per-gene count, mean and M2 (sum of squared deviations) and the distinct
(gene, sample) pairs; `merge` combines those with Chan et al.'s parallel update, so the statistics
are exact over the whole batch however it was split. Runs in worker processes.
"""

from __future__ import annotations

import csv
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.csv as pacsv

from daemon.processors.base import Facts, ProcessorError
from daemon.processors.options import GenomicsOptions

RESULT_NAME = "result.csv"
HEADER_MAX_BYTES = 16 << 20  # a wide header: one name per sample
GENE, SAMPLE, VALUE = "gene", "sample", "value"
STATS_COLUMNS = (GENE, "n", "mean", "m2")


def _empty_stats() -> pd.DataFrame:
    return pd.DataFrame(
        {
            GENE: pd.Series([], dtype="str"),
            "n": pd.Series([], dtype="int64"),
            "mean": pd.Series([], dtype="float64"),
            "m2": pd.Series([], dtype="float64"),
        }
    )


def _empty_pairs() -> pd.DataFrame:
    return pd.DataFrame({GENE: pd.Series([], dtype="str"), SAMPLE: pd.Series([], dtype="str")})


@dataclass(frozen=True)
class GenomicsPartial:
    """Per gene `n`, `mean`, `m2` (one row a gene), and the distinct (gene, sample) pairs."""

    stats: pd.DataFrame = field(default_factory=_empty_stats)
    pairs: pd.DataFrame = field(default_factory=_empty_pairs)


def _header(path: Path) -> tuple[str, list[str]]:
    """The delimiter (tab if the first line has one, else comma) and the column names."""
    with path.open("rb") as fh:
        first = fh.readline(HEADER_MAX_BYTES)
    if not first.strip():
        raise ProcessorError(path, "empty", "no header line")
    if b"\x00" in first:
        raise ProcessorError(path, "bad_table", "binary content, not a text table")
    try:
        line = first.decode("utf-8-sig")
    except UnicodeDecodeError:
        raise ProcessorError(path, "bad_table", "the header is not UTF-8 text") from None
    delimiter = "\t" if "\t" in line else ","
    names = next(csv.reader([line.rstrip("\r\n")], delimiter=delimiter))
    if len(set(names)) != len(names):
        raise ProcessorError(path, "bad_table", "duplicate column names")
    return delimiter, names


def _load(path: Path, delimiter: str, names: list[str]) -> pa.Table:
    """Every column as text, so gene IDs stay byte-exact (`SEPT2`, `1-Mar`, `000123` are no dates
    or numbers); values are converted later, where a bad one is dropped rather than fatal."""
    try:
        return pacsv.read_csv(
            path,
            # The pool already runs one batch per CPU: no extra reader threads.
            read_options=pacsv.ReadOptions(column_names=names, skip_rows=1, use_threads=False),
            parse_options=pacsv.ParseOptions(delimiter=delimiter),
            convert_options=pacsv.ConvertOptions(
                column_types=dict.fromkeys(names, pa.string()), strings_can_be_null=False
            ),
        )
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError, OSError) as exc:
        # Arrow's messages can quote a row: keep only the kind of failure.
        raise ProcessorError(
            path, "bad_table", f"not a readable table ({type(exc).__name__})"
        ) from None


def _numbers(column: pa.ChunkedArray) -> pd.Series[float]:
    """Expression values; anything missing, non-numeric or infinite becomes NaN (to be dropped)."""
    values: pd.Series[float] = pd.to_numeric(column.to_pandas(), errors="coerce").astype("float64")
    return values.where(np.isfinite(values.to_numpy()))


def _reduce(long: pd.DataFrame) -> GenomicsPartial:
    """Two-pass per-gene mean and M2 of one file (stable, unlike a sum of squares)."""
    by_gene = long.groupby(GENE, sort=True)[VALUE]
    mean = by_gene.transform("mean")
    long = long.assign(dev2=(long[VALUE] - mean) ** 2)
    grouped = long.groupby(GENE, sort=True)
    stats = pd.DataFrame(
        {"n": grouped[VALUE].count(), "mean": grouped[VALUE].mean(), "m2": grouped["dev2"].sum()}
    ).reset_index()
    pairs = long[[GENE, SAMPLE]].drop_duplicates().reset_index(drop=True)
    return GenomicsPartial(stats, pairs)


class GenomicsProcessor:
    kind: ClassVar[str] = "genomics"
    Options: ClassVar[type[GenomicsOptions]] = GenomicsOptions

    def __init__(self, options: GenomicsOptions) -> None:
        self.options = options

    def _layout(self, path: Path, names: list[str]) -> str:
        options = self.options
        gene = options.gene_column
        if gene not in names:
            raise ProcessorError(path, "missing_gene_column", f"no column named {gene!r}")
        is_long = {options.sample_column, options.expression_column} <= set(names)
        if options.layout == "long" or (options.layout == "auto" and is_long):
            if not is_long:
                raise ProcessorError(
                    path,
                    "missing_gene_column",
                    f"long layout needs {options.sample_column!r} and "
                    f"{options.expression_column!r} columns",
                )
            return "long"
        if len(names) < 2:
            raise ProcessorError(path, "missing_gene_column", "wide layout needs sample columns")
        return "wide"

    def read(self, path: Path, name: str) -> tuple[GenomicsPartial, Facts]:
        if path.stat().st_size == 0:
            raise ProcessorError(path, "empty", "the file has no bytes")
        delimiter, names = _header(path)
        layout = self._layout(path, names)
        table = _load(path, delimiter, names)
        if table.num_rows == 0:
            raise ProcessorError(path, "empty", "no data rows")
        long = self._long_form(table, layout)
        complete = long[VALUE].notna() & (long[GENE] != "") & (long[SAMPLE] != "")
        kept = long[complete]
        partial = _reduce(kept)
        facts: Facts = {
            "rows": table.num_rows,
            # A row is dropped when none of its values could be used.
            "rows_dropped": table.num_rows - int(kept["row"].nunique()),
            "values_dropped": len(long) - len(kept),
            "genes": len(partial.stats),
            "samples": int(kept[SAMPLE].nunique()),
        }
        return partial, facts

    def _long_form(self, table: pa.Table, layout: str) -> pd.DataFrame:
        """(row number, gene, sample, value) for every value of the table."""
        genes = table[self.options.gene_column].to_pandas()
        rows = pd.RangeIndex(table.num_rows)
        if layout == "long":
            return pd.DataFrame(
                {
                    "row": rows,
                    GENE: genes,
                    SAMPLE: table[self.options.sample_column].to_pandas(),
                    VALUE: _numbers(table[self.options.expression_column]),
                }
            )
        samples = [c for c in table.column_names if c != self.options.gene_column]
        parts = [
            pd.DataFrame(
                {
                    "row": rows,
                    GENE: genes,
                    SAMPLE: pd.Series(sample, index=rows, dtype="str"),
                    VALUE: _numbers(table[sample]),
                }
            )
            for sample in samples
        ]
        return pd.concat(parts, ignore_index=True)

    def merge(self, partials: Sequence[GenomicsPartial]) -> GenomicsPartial:
        """Chan et al. for k groups: N = sum n, mean = sum(n mean) / N,
        M2 = sum M2 + sum n (mean_i - mean)^2. Rows are put in a canonical order first, so the
        order of the partials does not change a bit of the result."""
        if not partials:
            return GenomicsPartial()
        stats = pd.concat([_empty_stats(), *(p.stats for p in partials)], ignore_index=True)
        if stats.empty:
            # Only files without a usable value (and so without pairs either). Not an edge to
            # run through the arithmetic: pandas types an empty `genes.map(mean)` as text.
            return GenomicsPartial()
        stats = stats.sort_values(list(STATS_COLUMNS), kind="mergesort", ignore_index=True)
        genes = stats[GENE]
        n = stats.groupby(GENE, sort=True)["n"].sum()
        mean = (stats["n"] * stats["mean"]).groupby(genes, sort=True).sum() / n
        spread = stats["n"] * (stats["mean"] - genes.map(mean)) ** 2
        m2 = stats.groupby(GENE, sort=True)["m2"].sum() + spread.groupby(genes, sort=True).sum()
        merged = pd.DataFrame({"n": n.astype("int64"), "mean": mean, "m2": m2})
        pairs = pd.concat([_empty_pairs(), *(p.pairs for p in partials)], ignore_index=True)
        pairs = pairs.drop_duplicates().sort_values([GENE, SAMPLE], ignore_index=True)
        return GenomicsPartial(merged.rename_axis(GENE).reset_index(), pairs)

    def write(self, merged: GenomicsPartial, folder: Path) -> list[str]:
        stats = merged.stats.sort_values(GENE, ignore_index=True)
        n = stats["n"]
        samples = merged.pairs.groupby(GENE, sort=True).size()
        result = pd.DataFrame(
            {
                GENE: stats[GENE],
                "n": n,
                "mean": stats["mean"],
                # Sample std (ddof=1); undefined, so empty, for a single value.
                "std": (stats["m2"] / (n - 1)).pow(0.5).where(n >= 2),
                "samples": stats[GENE].map(samples).fillna(0).astype("int64"),
            }
        )
        # Gene IDs are written byte-exact and quoted, never neutralised with a leading quote as
        # other processors' text cells are: they are join keys for the next tool, and a changed
        # ID is a wrong ID. So a hostile "=..." gene arrives as it was; open this file in a
        # spreadsheet only with the gene column imported as text.
        result.to_csv(
            folder / RESULT_NAME, index=False, quoting=csv.QUOTE_NONNUMERIC, lineterminator="\n"
        )
        return [RESULT_NAME]

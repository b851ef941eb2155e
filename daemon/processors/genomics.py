"""Gene-expression tables (CSV, TSV; long or wide): per-gene count, exact mean and sample std.

Each file is reduced to per-gene count, mean, M2 (sum of squared deviations), min, max and the
distinct (gene, sample) pairs; `merge` combines those with Chan et al.'s parallel update, so the
statistics are exact over the whole batch however it was split. Runs in worker processes.
"""

from __future__ import annotations

import csv
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import pyarrow as pa

from daemon.processors import genomics_rollup
from daemon.processors.base import Facts, ProcessorError
from daemon.processors.genomics_duplicates import PairLedger
from daemon.processors.genomics_input import open_table
from daemon.processors.genomics_table import (
    Cells,
    Codes,
    Floats,
    arrow_codes,
    dictionary_codes,
    load_table,
    long_cells,
    sorted_unique,
    wide_cells,
)
from daemon.processors.options import GenomicsOptions

RESULT_NAME = "result.csv"
RESULT_HEADER = ("gene", "n", "mean", "std", "samples")
STATS_COLUMNS = ("gene", "n", "mean", "m2", "sources", "low", "high")


def _no_codes() -> Codes:
    return np.zeros(0, dtype=np.int64)


def _no_floats() -> Floats:
    return np.zeros(0, dtype=np.float64)


def _no_genes() -> pa.Array:
    return pa.nulls(0, type=pa.string())


@dataclass(frozen=True, eq=False)
class GeneStats:
    """Per gene `n`, `mean`, `m2`, the input files it has values in (`sources`) and its
    lowest and highest value, one row a gene, sorted by gene ID (`stats["mean"]`)."""

    gene: pa.Array = field(default_factory=_no_genes)
    n: Codes = field(default_factory=_no_codes)
    mean: Floats = field(default_factory=_no_floats)
    m2: Floats = field(default_factory=_no_floats)
    sources: Codes = field(default_factory=_no_codes)
    low: Floats = field(default_factory=_no_floats)
    high: Floats = field(default_factory=_no_floats)

    def __len__(self) -> int:
        return len(self.n)

    def __getitem__(self, column: str) -> Any:
        if column not in STATS_COLUMNS:
            raise KeyError(column)
        return getattr(self, column)

    def equals(self, other: GeneStats) -> bool:
        """The same genes and the same numbers, to the bit."""
        return bool(self.gene.equals(other.gene)) and all(
            np.array_equal(self[c], other[c], equal_nan=True) for c in STATS_COLUMNS[1:]
        )


@dataclass(frozen=True, eq=False)
class GenomicsPartial:
    """Per-gene statistics, and the distinct (gene, sample) pairs, sorted, each as
    `row in stats * len(samples) + index in samples` (`samples` sorted)."""

    stats: GeneStats = field(default_factory=GeneStats)
    samples: tuple[str, ...] = ()
    pairs: Codes = field(default_factory=_no_codes)


def _reduce(cells: Cells) -> GenomicsPartial:
    """Per-gene mean, refined by the mean deviation from it (about as exact as a compensated
    sum), and M2 as the sum of squared deviations from it, never as a difference of sums."""
    genes, values = cells.genes, cells.values
    size = len(cells.gene_ids)
    n = np.bincount(genes, minlength=size).astype(np.int64)
    per = np.maximum(n, 1)
    mean = _sums(genes, values, size) / per
    mean += _sums(genes, values - mean[genes], size) / per
    m2 = _sums(genes, (values - mean[genes]) ** 2, size)
    low, high = np.full(size, np.inf), np.full(size, -np.inf)
    np.minimum.at(low, genes, values)
    np.maximum.at(high, genes, values)
    has = n > 0
    row = np.cumsum(has) - 1  # a gene's row among the genes that have a value
    width = len(cells.sample_ids)
    pairs = sorted_unique(row[genes] * width + cells.samples, int(has.sum()) * width)
    genes_kept = cells.gene_ids.take(arrow_codes(np.flatnonzero(has)))
    one_source = np.ones(len(genes_kept), dtype=np.int64)
    stats = GeneStats(genes_kept, n[has], mean[has], m2[has], one_source, low[has], high[has])
    return GenomicsPartial(stats, cells.sample_ids, pairs)


def _sums(groups: Codes, weights: Floats, size: int) -> Floats:
    """Per group the sum of its weights, added in the order given."""
    return np.bincount(groups, weights=weights, minlength=size).astype(np.float64, copy=False)


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

    def _numeric(self, names: list[str], layout: str) -> set[str]:
        """The value columns, but never an ID column (even one also named the value column)."""
        options = self.options
        if layout == "wide":
            return set(names) - {options.gene_column}
        return {options.expression_column} - {options.gene_column, options.sample_column}

    def _cells(self, path: Path) -> tuple[Cells, Facts]:
        """One file's usable values, with the facts of its parse (before repeats are resolved)."""
        source = open_table(path, self.options)
        layout = self._layout(path, source.names)
        table = load_table(source, self._numeric(source.names, layout))
        if table.num_rows == 0:
            raise ProcessorError(path, "empty", "no data rows")
        options = self.options
        if layout == "long":
            cells = long_cells(
                table, options.gene_column, options.sample_column, options.expression_column
            )
        else:
            cells = wide_cells(table, options.gene_column)
        facts: Facts = {
            "rows": table.num_rows,
            # A row is dropped when none of its values could be used.
            "rows_dropped": table.num_rows - len(sorted_unique(cells.rows, table.num_rows)),
            "values_dropped": cells.n_values - len(cells.values),
        }
        if source.compression is not None:
            facts["compression"] = source.compression
        return cells, facts

    def read(self, path: Path, name: str) -> tuple[GenomicsPartial, Facts]:
        partials, outcomes = self.read_many([(path, name)])
        outcome = outcomes[0]
        if isinstance(outcome, ProcessorError):
            raise outcome
        return partials[0], outcome

    def read_many(
        self, inputs: Sequence[tuple[Path, str]]
    ) -> tuple[list[GenomicsPartial], list[Facts | ProcessorError]]:
        """The batch's files together, so that a (gene, sample) pair repeated across them is
        seen and resolved by the `duplicate_pairs` rule; one outcome per input, in order."""
        ledger = PairLedger(self.options.duplicate_pairs)
        partials: list[GenomicsPartial] = []
        outcomes: list[Facts | ProcessorError] = []
        parsed: Iterable[tuple[Path, tuple[Cells, Facts] | ProcessorError]]
        parsed = self._each_parsed(inputs)
        resolve: Callable[[Path, Cells], tuple[Cells, int] | ProcessorError] = ledger.take
        if not ledger.streams:  # "mean" needs every file's cells first; else one file at a time
            parsed = list(parsed)
            read = [(p, item[0]) for p, item in parsed if not isinstance(item, ProcessorError)]
            resolved = iter(ledger.resolve(read))
            resolve = lambda _path, _cells: next(resolved)  # noqa: E731 - in batch order
        for path, item in parsed:
            if isinstance(item, ProcessorError):
                outcomes.append(item)
            else:
                self._fold(resolve(path, item[0]), item[1], partials, outcomes)
        return partials, outcomes

    def _each_parsed(
        self, inputs: Sequence[tuple[Path, str]]
    ) -> Iterator[tuple[Path, tuple[Cells, Facts] | ProcessorError]]:
        """Each input's usable cells and facts, or its error, read when asked for."""
        for path, _ in inputs:
            try:
                yield path, self._cells(path)
            except ProcessorError as exc:
                yield path, exc

    @staticmethod
    def _fold(
        outcome: tuple[Cells, int] | ProcessorError,
        facts: Facts,
        partials: list[GenomicsPartial],
        outcomes: list[Facts | ProcessorError],
    ) -> None:
        """One file's resolved cells reduced to its partial, and its facts; or its error."""
        if isinstance(outcome, ProcessorError):
            outcomes.append(outcome)
            return
        cells, repeats = outcome
        partial = _reduce(cells)
        partials.append(partial)
        n_samples = len(sorted_unique(cells.samples, len(cells.sample_ids)))
        outcomes.append({**facts, "duplicate_pairs": repeats, "genes": len(partial.stats),
                         "samples": n_samples})  # fmt: skip

    def merge(self, partials: Sequence[GenomicsPartial]) -> GenomicsPartial:
        """Chan et al. for k groups: N = sum n, mean = sum(n mean) / N,
        M2 = sum M2 + sum n (mean_i - mean)^2. Rows are put in a canonical order first, so the
        order of the partials does not change a bit of the result."""
        parts = [p for p in partials if len(p.stats)]
        if not parts:
            # Only files without a usable value (and so without pairs either).
            return GenomicsPartial()
        gene_ids, genes, _ = dictionary_codes(pa.chunked_array([p.stats.gene for p in parts]))
        n_in = np.concatenate([p.stats.n for p in parts]).astype(np.float64)
        mean_in = np.concatenate([p.stats.mean for p in parts])
        m2_in = np.concatenate([p.stats.m2 for p in parts])
        order = np.lexsort((m2_in, mean_in, n_in, genes))
        by, n_by, mean_by = genes[order], n_in[order], mean_in[order]
        size = len(gene_ids)
        n = _sums(by, n_by, size)
        mean = _sums(by, n_by * mean_by, size) / n
        m2 = _sums(by, m2_in[order], size) + _sums(by, n_by * (mean_by - mean[by]) ** 2, size)
        samples, pairs = _merge_pairs(parts, genes, len(gene_ids))
        sources, low, high = _merge_ranges(parts, by, order)
        stats = GeneStats(gene_ids, n.astype(np.int64), mean, m2, sources, low, high)
        return GenomicsPartial(stats, samples, pairs)

    def rollup_partial(self, merged: GenomicsPartial) -> dict[str, Any]:
        """The batch's mergeable statistics as JSON, for the pipeline's rollup."""
        return genomics_rollup.rollup_partial(merged.stats)

    def write(self, merged: GenomicsPartial, folder: Path) -> list[str]:
        stats = merged.stats
        samples = np.bincount(merged.pairs // max(len(merged.samples), 1), minlength=len(stats))
        columns = (stats.gene.to_pylist(), stats.n.tolist(), stats.mean.tolist())
        rows = zip(*columns, _std_cells(stats.m2, stats.n), samples.tolist(), strict=True)
        # Gene IDs are written byte-exact and quoted, never neutralised with a leading quote as
        # other processors' text cells are: they are join keys for the next tool, and a changed
        # ID is a wrong ID. So a hostile "=..." gene arrives as it was; open this file in a
        # spreadsheet only with the gene column imported as text.
        with (folder / RESULT_NAME).open("w", encoding="utf-8", newline="") as fh:
            writer = csv.writer(fh, quoting=csv.QUOTE_NONNUMERIC, lineterminator="\n")
            writer.writerow(RESULT_HEADER)
            writer.writerows(rows)
        return [RESULT_NAME]


def _std_cells(m2: Floats, n: Codes) -> list[float | str]:
    """Sample std (ddof=1); undefined, so empty, for a single value."""
    with np.errstate(divide="ignore", invalid="ignore"):
        std: list[float] = ((m2 / (n - 1)) ** 0.5).tolist()
    return [s if k >= 2 else "" for s, k in zip(std, n.tolist(), strict=True)]


def _merge_ranges(
    parts: list[GenomicsPartial], by: Codes, order: Codes
) -> tuple[Codes, Floats, Floats]:
    """Per merged gene its sources (added up), lowest and highest value; `by` is each part row's
    merged gene in `order`, sorted, and every gene has a row, so each run of `by` is one gene."""
    starts = np.flatnonzero(np.concatenate(([True], by[1:] != by[:-1])))

    def column(name: str) -> Any:
        return np.concatenate([p.stats[name] for p in parts])[order]

    return (
        np.add.reduceat(column("sources"), starts),
        np.minimum.reduceat(column("low"), starts),
        np.maximum.reduceat(column("high"), starts),
    )


def _merge_pairs(
    parts: list[GenomicsPartial], genes: Codes, n_genes: int
) -> tuple[tuple[str, ...], Codes]:
    """The union of the parts' (gene, sample) pairs over the union of their sample names;
    `genes` holds the merged row of each part's stats rows, part after part."""
    names = sorted(set().union(*(p.samples for p in parts)))
    index = {name: i for i, name in enumerate(names)}
    chunks, start = [], 0
    for part in parts:
        rows = genes[start : start + len(part.stats)]
        start += len(part.stats)
        width = len(part.samples)  # not 0: a part with genes has samples
        sample_map = np.array([index[s] for s in part.samples], dtype=np.int64)
        chunks.append(rows[part.pairs // width] * len(names) + sample_map[part.pairs % width])
    return tuple(names), sorted_unique(np.concatenate(chunks), n_genes * len(names))

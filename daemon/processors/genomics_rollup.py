"""A genomics batch's mergeable statistics as plain JSON, for the pipeline's rollup. Worker side.

Per gene: `n`, `sources` and one value column, `expression`, as [count, sum, m2, min, max]: the
shape the EMR share has, so `daemon.rollup` merges (Chan et al.) and renders both alike. Distinct
samples per gene are no part of it: they cannot be merged from counts (see the README).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from daemon.processors.genomics import GeneStats

VALUE_COLUMN = "expression"
# As the batch's result.csv: `gene`, `n`, `mean`, `std` (statistics named without the column).
STATISTICS = ("mean", "std")


def rollup_partial(stats: GeneStats) -> dict[str, Any]:
    """`stats` (merged over the batch) as JSON. Gene IDs are kept byte-exact, as result.csv
    publishes them (join keys, never neutralised), and no small-cell rule applies: genomics
    has none (`min_cell_size` None), so neither has its rollup."""
    columns = zip(
        stats.gene.to_pylist(),
        stats.n.tolist(),
        stats.mean.tolist(),
        stats.m2.tolist(),
        stats.sources.tolist(),
        stats.low.tolist(),
        stats.high.tolist(),
        strict=True,
    )
    groups = {
        gene: {
            "label": gene,
            "n": n,
            "sources": sources,
            "columns": {VALUE_COLUMN: [n, n * mean, m2, low, high]},
        }
        for gene, n, mean, m2, sources, low, high in columns
    }
    return {
        "spec": {
            "kind": "genomics",
            "group_by": "gene",
            "statistics": list(STATISTICS),
            "bare_statistics": True,
            "with_n": False,
            "min_cell_size": None,
            "columns": [VALUE_COLUMN],
        },
        "groups": groups,
    }

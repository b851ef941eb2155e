"""Repeated (gene, sample) pairs within a batch: found by name across its files and resolved by
the pipeline's `duplicate_pairs` rule ("error", "first" or "mean") before any statistic.
Runs in worker processes."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np

from daemon.processors.base import ProcessorError
from daemon.processors.genomics_table import Cells, Codes, Flags, Floats

SAMPLE_BITS = 32  # a pair's code: gene number << 32 | sample number
SAMPLE_MASK = (1 << SAMPLE_BITS) - 1


class PairLedger:
    """Numbers every gene and sample name met in the batch, so that the same pair has the same
    code in every file, and resolves repeats by the rule."""

    def __init__(self, rule: str) -> None:
        self.rule = rule
        self._genes: dict[str, int] = {}
        self._samples: dict[str, int] = {}
        self._seen = _SeenPairs()

    @property
    def streams(self) -> bool:
        """Whether files can be resolved one at a time, in batch order (`take`): under "error"
        and "first" a file's repeats are the pairs of the files before it; "mean" needs all."""
        return self.rule != "mean"

    def _numbers(self, table: dict[str, int], names: Sequence[str]) -> Codes:
        return np.array([table.setdefault(name, len(table)) for name in names], dtype=np.int64)

    def codes(self, cells: Cells) -> Codes:
        genes = self._numbers(self._genes, cells.gene_ids.to_pylist())
        samples = self._numbers(self._samples, cells.sample_ids)
        pairs = genes[cells.genes]  # a new array: shifted and combined in place
        pairs <<= SAMPLE_BITS
        pairs |= samples[cells.samples]
        return pairs

    def resolve(
        self, files: Sequence[tuple[Path, Cells]]
    ) -> list[tuple[Cells, int] | ProcessorError]:
        """Per file, in batch order: its cells with repeats resolved and how many of its values
        were of a pair that an earlier file has (dropped, or folded into one mean), or the
        error that quarantines it ("error" rule). Repeats within one file are replicates: kept."""
        if self.streams:
            return [self.take(path, cells) for path, cells in files]
        codes = [self.codes(cells) for _, cells in files]
        return _fold_repeats(files, codes) if files else []

    def take(self, path: Path, cells: Cells) -> tuple[Cells, int] | ProcessorError:
        """The next file in batch order ("error", "first"): under "error" a file carrying a pair
        of an earlier (accepted) file is refused; under "first" its values of such pairs are
        dropped. Only the pair codes are kept for the files after it, not their cells."""
        own = self.codes(cells)
        is_repeat = self._seen.contains(own)
        repeats = int(np.count_nonzero(is_repeat))
        if repeats and self.rule == "error":
            return ProcessorError(
                path,
                "duplicate_pairs",
                f"{repeats} values of (gene, sample) pairs that an earlier file of the batch "
                'has (duplicate_pairs = "error"; "first" or "mean" resolve them)',
            )
        self._seen.add(own)
        if not repeats:  # the usual file: nothing to drop, nothing to copy
            return cells, 0
        keep = ~is_repeat
        return _subset(cells, keep, cells.values[keep]), repeats


# NumPy's `unique`, `isin` and `union1d` hash first (NumPy 2.3+): 30x slower on these codes than
# a sort, so the set operations below sort.


def _sorted_unique(codes: Codes) -> Codes:
    ordered = np.sort(codes)
    first = np.ones(len(ordered), dtype=np.bool_)
    np.not_equal(ordered[1:], ordered[:-1], out=first[1:])
    return ordered[first]


def _is_in(codes: Codes, ordered: Codes) -> Flags:
    """Which codes are in `ordered` (sorted, unique)."""
    if not len(ordered):
        return np.zeros(len(codes), dtype=np.bool_)
    at = np.minimum(np.searchsorted(ordered, codes), len(ordered) - 1)
    found: Flags = ordered[at] == codes
    return found


def _groups(codes: Codes) -> tuple[Codes, Codes]:
    """Each code's group number (groups in code order) and each group's first place."""
    order = np.argsort(codes, kind="stable")
    ordered = codes[order]
    starts = np.ones(len(ordered), dtype=np.bool_)
    np.not_equal(ordered[1:], ordered[:-1], out=starts[1:])
    group = np.empty(len(codes), dtype=np.int64)
    group[order] = np.cumsum(starts) - 1
    return group, order[starts]


def _subset(cells: Cells, keep: Flags, values: Floats) -> Cells:
    return cells._replace(
        values=values, genes=cells.genes[keep], samples=cells.samples[keep], rows=cells.rows[keep]
    )


class _SeenPairs:
    """The pair codes of the files accepted so far. Only a value whose sample an earlier file
    had can repeat a pair, so the (sorted) set is built only when such a value comes: never
    for the usual batch of files with samples of their own."""

    def __init__(self) -> None:
        self._chunks: list[Codes] = []
        self._samples = np.zeros(0, dtype=np.bool_)

    def contains(self, codes: Codes) -> Flags:
        samples = codes & SAMPLE_MASK
        known = samples < len(self._samples)
        known[known] = self._samples[samples[known]]
        if not known.any():
            return known
        ordered = _sorted_unique(np.concatenate(self._chunks))
        self._chunks = [ordered]
        found = np.zeros(len(codes), dtype=np.bool_)
        found[known] = _is_in(codes[known], ordered)
        return found

    def add(self, codes: Codes) -> None:
        self._chunks.append(codes)
        samples = codes & SAMPLE_MASK
        if len(samples):
            size = max(len(self._samples), int(samples.max()) + 1)
            grown = np.zeros(size, dtype=np.bool_)
            grown[: len(self._samples)] = self._samples
            grown[samples] = True
            self._samples = grown


def _fold_repeats(
    files: Sequence[tuple[Path, Cells]], codes: list[Codes]
) -> list[tuple[Cells, int] | ProcessorError]:
    """Under "mean" a pair found in two files or more becomes one value, the mean of all its
    values in the batch, kept at its first place; a pair of one file keeps its values."""
    every = np.concatenate(codes)
    values = np.concatenate([cells.values for _, cells in files])
    file_of = np.repeat(np.arange(len(files)), [len(c) for c in codes])
    pair, first_at = _groups(every)
    in_file = _sorted_unique(pair * len(files) + file_of) // len(files)
    n_files = np.bincount(in_file, minlength=len(first_at))
    mean = np.bincount(pair, weights=values) / np.bincount(pair)
    is_folded = n_files[pair] > 1
    keep = ~is_folded
    keep[first_at[n_files > 1]] = True
    kept = np.where(is_folded, mean[pair], values)
    out: list[tuple[Cells, int] | ProcessorError] = []
    start = 0
    for _, cells in files:
        stop = start + len(cells.values)
        mine = keep[start:stop]
        folded = int(np.count_nonzero(is_folded[start:stop] & ~mine))
        out.append((_subset(cells, mine, kept[start:stop][mine]), folded))
        start = stop
    return out

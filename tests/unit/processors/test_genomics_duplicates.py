"""Repeated (gene, sample) pairs across a batch's files (issue 14.7): counted per file in the
facts and resolved by `duplicate_pairs`, each rule checked against pandas on the same tables."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest

from daemon.errors import ProcessorError
from daemon.processors.genomics import GenomicsProcessor
from daemon.processors.options import GenomicsOptions

RNG = np.random.default_rng(23)


def table(genes: list[str], samples: list[str], replicates: int = 1) -> pd.DataFrame:
    pairs = [(g, s) for g in genes for s in samples for _ in range(replicates)]
    values = RNG.normal(10.0, 3.0, len(pairs)).round(6)
    return pd.DataFrame({"gene": [g for g, _ in pairs], "sample": [s for _, s in pairs],
                         "expression": values})  # fmt: skip


def tables() -> list[pd.DataFrame]:
    """b repeats two of a's samples for gene G1 and G2; c repeats one pair of b's only; a has
    replicates of its own (kept whatever the rule)."""
    return [
        table(["G1", "G2"], ["S1", "S2"], replicates=2),
        table(["G1", "G2", "G3"], ["S2", "S3"]),
        table(["G3", "G4"], ["S3"]),
    ]


def run(tmp_path: Path, rule: str, frames: list[pd.DataFrame]) -> tuple[pd.DataFrame, list[Any]]:
    paths = []
    for i, frame in enumerate(frames):
        path = tmp_path / f"t{i}.csv"
        frame.to_csv(path, index=False)
        paths.append((path, path.name))
    proc = GenomicsProcessor(GenomicsOptions(duplicate_pairs=rule))
    partials, outcomes = proc.read_many(paths)
    out = tmp_path / f"out-{rule}"
    out.mkdir()
    proc.write(proc.merge(partials), out)
    result = pd.read_csv(out / "result.csv", dtype={"gene": str}).set_index("gene")
    return result, outcomes


def expected(long: pd.DataFrame) -> pd.DataFrame:
    grouped = long.groupby("gene")["expression"]
    return pd.DataFrame({"n": grouped.count(), "mean": grouped.mean()})


def assert_matches(result: pd.DataFrame, long: pd.DataFrame) -> None:
    want = expected(long)
    assert list(result.index) == list(want.index)
    assert result["n"].tolist() == want["n"].tolist()
    np.testing.assert_allclose(result["mean"], want["mean"], rtol=1e-12)


def test_error_quarantines_the_file_that_repeats(tmp_path: Path) -> None:
    """b repeats a's pairs: refused; c repeats only b's, which was refused: kept."""
    frames = tables()
    result, outcomes = run(tmp_path, "error", frames)
    assert isinstance(outcomes[1], ProcessorError) and outcomes[1].reason == "duplicate_pairs"
    assert outcomes[0]["duplicate_pairs"] == 0 and outcomes[2]["duplicate_pairs"] == 0
    assert_matches(result, pd.concat([frames[0], frames[2]]))


def test_first_keeps_the_first_files_values(tmp_path: Path) -> None:
    frames = tables()
    result, outcomes = run(tmp_path, "first", frames)
    seen: set[tuple[str, str]] = set()
    kept = []
    for frame in frames:
        pairs = set(zip(frame["gene"], frame["sample"], strict=True))
        kept.append(frame[[(g, s) not in seen for g, s in zip(frame["gene"], frame["sample"],
                                                               strict=True)]])  # fmt: skip
        seen |= pairs
    assert [o["duplicate_pairs"] for o in outcomes] == [0, 2, 1]
    assert_matches(result, pd.concat(kept))


def test_mean_makes_a_repeated_pair_one_value(tmp_path: Path) -> None:
    frames = tables()
    result, outcomes = run(tmp_path, "mean", frames)
    long = pd.concat([f.assign(file=i) for i, f in enumerate(frames)])
    files_per_pair = long.groupby(["gene", "sample"])["file"].transform("nunique")
    repeated = long[files_per_pair > 1].groupby(["gene", "sample"], as_index=False)["expression"]
    folded = pd.concat([long[files_per_pair == 1], repeated.mean()])
    # G1/S2 and G2/S2 (2 replicates each in a, 1 each in b) become one value each, kept in a:
    # a folds away 2 values, b 2; G3/S3 (b and c) is kept in b, c folds away 1.
    assert [o["duplicate_pairs"] for o in outcomes] == [2, 2, 1]
    assert_matches(result, folded)


@pytest.mark.parametrize("rule", ["error", "first", "mean"])
def test_replicates_within_one_file_all_count(tmp_path: Path, rule: str) -> None:
    """Repeats inside one file are replicates, not duplicates: every rule keeps them."""
    frame = table(["G1", "G2"], ["S1"], replicates=3)
    result, outcomes = run(tmp_path, rule, [frame])
    assert outcomes[0]["duplicate_pairs"] == 0
    assert_matches(result, frame)


def wide_table(path: Path, n_genes: int, samples: list[str]) -> Path:
    values = RNG.normal(10.0, 3.0, (n_genes, len(samples))).round(4)
    frame = pd.DataFrame(values, columns=samples)
    frame.insert(0, "gene", [f"G{i}" for i in range(n_genes)])
    frame.to_csv(path, index=False)
    return path


@pytest.mark.parametrize("rule", ["error", "first"])
def test_a_batch_holds_one_file_of_cells_at_a_time(tmp_path: Path, rule: str) -> None:
    """Under "error" and "first" each file is resolved and reduced before the next is read:
    a batch of eight tables peaks well under eight times one table (a file's cells are ~40
    bytes a value; what stays for the files after it, its pair codes and its partial's
    pairs, ~16)."""
    import tracemalloc

    paths = [wide_table(tmp_path / f"w{i}.csv", 20_000, [f"S{i}_{j}" for j in range(10)])
             for i in range(8)]  # fmt: skip
    processor = GenomicsProcessor(GenomicsOptions(gene_column="gene", duplicate_pairs=rule))
    peaks = []
    for batch in (paths[:1], paths):
        tracemalloc.start()
        _, outcomes = processor.read_many([(p, p.name) for p in batch])
        peaks.append(tracemalloc.get_traced_memory()[1])
        tracemalloc.stop()
        assert [o["duplicate_pairs"] for o in outcomes] == [0] * len(batch)  # type: ignore[index]
    one, eight = peaks
    assert eight < 4 * one, f"peak {eight >> 20} MiB for 8 tables, {one >> 20} MiB for one"

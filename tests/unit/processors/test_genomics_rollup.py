"""The genomics batch's share of a rollup: plain JSON per gene, exact over any split of the rows
into files and batches, in long and wide form; gene IDs byte-exact; no sample id, no small-cell
rule."""

from __future__ import annotations

import csv
import io
import json
import math
import random
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest

from daemon.processors.genomics import GenomicsProcessor
from daemon.processors.options import GenomicsOptions
from daemon.rollup import Period, render_csv

GENES = ["SEPT2", "MARCH1", "1-Mar", "000123", "TP53", "=SUM(A1)", 'a,"b"']


def long_rows(rng: random.Random, count: int, samples: list[str]) -> pd.DataFrame:
    return pd.DataFrame(
        {
            "gene": [rng.choice(GENES) for _ in range(count)],
            "sample": [rng.choice(samples) for _ in range(count)],
            "expression": [rng.lognormvariate(4.0, 1.5) for _ in range(count)],
        }
    )


def write(path: Path, rows: pd.DataFrame, layout: str) -> Path:
    """The rows as a long CSV, or (one value a pair) a wide TSV."""
    if layout == "long":
        rows.to_csv(path, index=False, float_format="%.17g")
    else:
        wide = rows.pivot(index="gene", columns="sample", values="expression").reset_index()
        wide.to_csv(path, sep="\t", index=False, float_format="%.17g", na_rep="")
    return path


def share(proc: GenomicsProcessor, paths: list[Path]) -> dict[str, Any]:
    """One batch of `paths`, merged, as it crosses to the main process."""
    merged = proc.merge([proc.read(path, path.name)[0] for path in paths])
    return dict(json.loads(json.dumps(proc.rollup_partial(merged))))


def cuts(rng: random.Random, size: int, pieces: int) -> list[slice]:
    """`size` split into up to `pieces` contiguous runs, empty runs dropped."""
    points = sorted(rng.sample(range(1, size), k=min(pieces - 1, size - 1)))
    return [slice(a, b) for a, b in zip([0, *points], [*points, size], strict=True)]


def share_of(path: Path) -> dict[str, Any]:
    return share(GenomicsProcessor(GenomicsOptions()), [path])


def period_of(*shares: dict[str, Any]) -> Period:
    period = Period()
    for i, got in enumerate(shares):
        assert period.add(f"B{i}", got)
    return period


def rollup_table(shares: list[dict[str, Any]]) -> pd.DataFrame:
    text = render_csv(period_of(*shares))
    return pd.read_csv(
        io.StringIO(text), dtype={"gene": str}, keep_default_na=False, na_values={"std": [""]}
    )


@pytest.mark.parametrize("layout", ["long", "wide"])
@pytest.mark.parametrize("seed", range(4))
def test_rollup_equals_pandas_over_any_split(tmp_path: Path, layout: str, seed: int) -> None:
    """Rows cut at random into files, files cut at random into batches: the rollup's n, mean
    and std per gene equal pandas' over all rows (within 1e-9); min, max and sources (the files
    a gene has values in) in the share are exact."""
    rng = random.Random(seed)
    if layout == "long":
        rows = long_rows(rng, rng.randint(40, 400), [f"S{k}" for k in range(6)])
    else:  # one value a (gene, sample) pair, samples spread over the files
        pairs = [(g, f"S{k}") for g in GENES for k in range(rng.randint(8, 40))]
        rows = pd.DataFrame(pairs, columns=["gene", "sample"])
        rows["expression"] = [rng.normalvariate(50.0, 20.0) for _ in pairs]
        rows = rows.sort_values("sample", kind="stable", ignore_index=True)
    files = cuts(rng, len(rows), rng.randint(1, 7))
    paths = [write(tmp_path / f"f{i}", rows[part], layout) for i, part in enumerate(files)]
    proc = GenomicsProcessor(GenomicsOptions(layout=layout))
    batches = cuts(rng, len(paths), rng.randint(1, len(paths)))
    shares = [share(proc, paths[part]) for part in batches]
    rng.shuffle(shares)

    table = rollup_table(shares)
    assert list(table.columns) == ["gene", "n", "mean", "std"]  # as result.csv, no `samples`
    want = rows.groupby("gene")["expression"].agg(["count", "mean", "std", "min", "max"])
    assert table["gene"].tolist() == sorted(want.index)
    table = table.set_index("gene")
    assert table["n"].tolist() == want["count"].tolist()
    np.testing.assert_allclose(table["mean"], want["mean"], rtol=1e-9)
    np.testing.assert_allclose(table["std"], want["std"], rtol=1e-9)

    in_files = (
        pd.concat([rows[part].assign(file=i) for i, part in enumerate(files)])
        .groupby("gene")["file"]
        .nunique()
    )
    for gene in want.index:
        groups = [s["groups"][gene] for s in shares if gene in s["groups"]]
        assert sum(g["sources"] for g in groups) == in_files[gene]
        columns = [g["columns"]["expression"] for g in groups]
        assert min(c[3] for c in columns) == want.loc[gene, "min"]
        assert max(c[4] for c in columns) == want.loc[gene, "max"]


def test_share_is_plain_json_without_sample_ids(tmp_path: Path) -> None:
    """Per gene its label (byte-exact), n, sources and [count, sum, m2, min, max]; the spec
    names the statistics as result.csv does and sets no small-cell rule; sample ids (which
    may be patient identifiers) are nowhere in it."""
    path = tmp_path / "in.csv"
    path.write_text(
        "gene,sample,expression\nTP53,Jane-Doe-1970,1.0\nTP53,MRN-0042,3.0\n=SUM(A1),MRN-0042,5\n"
    )
    got = share(GenomicsProcessor(GenomicsOptions()), [path])
    assert "Jane-Doe" not in json.dumps(got) and "MRN-0042" not in json.dumps(got)
    assert got["spec"]["columns"] == ["expression"]
    assert (got["spec"]["statistics"], got["spec"]["min_cell_size"]) == (["mean", "std"], None)
    tp53 = got["groups"]["TP53"]
    assert (tp53["label"], tp53["n"], tp53["sources"]) == ("TP53", 2, 1)
    assert tp53["columns"]["expression"] == [2, 4.0, 2.0, 1.0, 3.0]
    assert got["groups"]["=SUM(A1)"]["label"] == "=SUM(A1)"  # a join key: never neutralised


def test_no_gene_is_suppressed_however_small(tmp_path: Path) -> None:
    """Genomics has no min_cell_size, so neither has its rollup: a gene with one value is
    published with its n and mean (std empty), and the table has no `suppressed` column."""
    path = tmp_path / "in.csv"
    path.write_text("gene,sample,expression\nSOLO,S1,7.25\nPAIR,S1,1\nPAIR,S2,2\n")
    rows = list(csv.DictReader(io.StringIO(render_csv(period_of(share_of(path))))))
    assert rows == [
        {"gene": "PAIR", "n": "2", "mean": "1.5", "std": repr(math.sqrt(0.5))},
        {"gene": "SOLO", "n": "1", "mean": "7.25", "std": ""},
    ]


def test_an_emr_table_starts_over_for_a_genomics_share(tmp_path: Path) -> None:
    """A pipeline whose kind changed (emr to genomics under one name) cannot add its groups
    up, even with `group_by = "gene"`: the table starts over from the genomics batch."""
    emr = {"spec": {"group_by": "gene", "missing": "row", "statistics": ["mean"],
                    "columns": ["age"]},
           "groups": {"TP53": {"label": "TP53", "n": 1, "sources": 1,
                               "columns": {"age": [1, 5.0, 0.0, 5.0, 5.0]}}}}  # fmt: skip
    path = tmp_path / "in.csv"
    path.write_text("gene,sample,expression\nTP53,S1,1\n")
    period = period_of(emr)
    assert not period.is_compatible(share_of(path)["spec"])

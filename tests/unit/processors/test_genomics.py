"""Genomics processor: per-gene n, mean and std equal pandas' on the concatenated tables, in long
and wide form; gene IDs stay byte-exact; merge is associative; bad tables quarantine."""

from __future__ import annotations

import pickle
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest

from daemon.errors import ProcessorError
from daemon.processors.genomics import GenomicsPartial, GenomicsProcessor
from daemon.processors.genomics_table import NOT_NUMBERS
from daemon.processors.options import GenomicsOptions

# IDs that spreadsheets and type inference love to mangle.
TRICKY_GENES = ["SEPT2", "MARCH1", "1-Mar", "ENSG00000141510.17", "000123", "TP53"]
SAMPLES = ["S1", "S2", "S3", "S4"]
RNG = np.random.default_rng(11)


def processor(**options: Any) -> GenomicsProcessor:
    return GenomicsProcessor(GenomicsOptions(**options))


def long_table(n_rows: int) -> pd.DataFrame:
    return pd.DataFrame(
        {
            "gene": RNG.choice(TRICKY_GENES, n_rows),
            "sample": RNG.choice(SAMPLES, n_rows),
            "expression": RNG.normal(100.0, 25.0, n_rows).round(6),
        }
    )


def write_long(path: Path, table: pd.DataFrame, sep: str = ",") -> Path:
    table.to_csv(path, sep=sep, index=False)
    return path


def write_wide(path: Path, table: pd.DataFrame, sep: str = "\t") -> Path:
    """Wide form of a long table with one value per (gene, sample)."""
    wide = table.pivot(index="gene", columns="sample", values="expression").reset_index()
    wide.to_csv(path, sep=sep, index=False)
    return path


def expected(table: pd.DataFrame) -> pd.DataFrame:
    """What pandas says on the whole concatenated table."""
    grouped = table.groupby("gene", sort=True)
    return pd.DataFrame(
        {
            "n": grouped["expression"].count(),
            "mean": grouped["expression"].mean(),
            "std": grouped["expression"].std(ddof=1),
            "samples": grouped["sample"].nunique(),
        }
    )


def published(proc: GenomicsProcessor, partials: list[GenomicsPartial], folder: Path) -> Any:
    folder.mkdir(exist_ok=True)
    assert proc.write(proc.merge(partials), folder) == ["result.csv"]
    result = pd.read_csv(
        folder / "result.csv", dtype={"gene": str}, keep_default_na=False, na_values={"std": [""]}
    )
    return result.set_index("gene")


def assert_matches(result: pd.DataFrame, table: pd.DataFrame) -> None:
    want = expected(table)
    assert list(result.index) == list(want.index)
    assert result["n"].tolist() == want["n"].tolist()
    assert result["samples"].tolist() == want["samples"].tolist()
    np.testing.assert_allclose(result["mean"], want["mean"], rtol=1e-12)
    np.testing.assert_allclose(result["std"], want["std"], rtol=1e-9)


def reason_of(proc: GenomicsProcessor, path: Path) -> ProcessorError:
    with pytest.raises(ProcessorError) as info:
        proc.read(path, path.name)
    return info.value


def test_long_form_equals_pandas(tmp_path: Path) -> None:
    """Long CSV and TSV files merge to pandas' statistics on their concatenation."""
    tables = [long_table(40), long_table(25), long_table(60)]
    paths = [
        write_long(tmp_path / "a.csv", tables[0]),
        write_long(tmp_path / "b.tsv", tables[1], sep="\t"),
        write_long(tmp_path / "c", tables[2]),  # a spooled file may have no extension
    ]
    proc = processor()
    partials = [proc.read(path, path.name)[0] for path in paths]
    assert_matches(published(proc, partials, tmp_path / "out"), pd.concat(tables))


def test_wide_form_equals_pandas(tmp_path: Path) -> None:
    """Wide TSV and CSV files merge to pandas' statistics on the long concatenation."""
    tables = [long_table(200).drop_duplicates(["gene", "sample"]) for _ in range(2)]
    paths = [
        write_wide(tmp_path / "a.tsv", tables[0]),
        write_wide(tmp_path / "b.csv", tables[1], sep=","),
    ]
    proc = processor()
    partials = [proc.read(path, path.name)[0] for path in paths]
    assert_matches(published(proc, partials, tmp_path / "out"), pd.concat(tables))


def test_long_and_wide_in_one_batch(tmp_path: Path) -> None:
    """A long and a wide file in one batch add up as one table."""
    long, wide = long_table(30), long_table(100).drop_duplicates(["gene", "sample"])
    proc = processor()
    partials = [
        proc.read(write_long(tmp_path / "l.csv", long), "l.csv")[0],
        proc.read(write_wide(tmp_path / "w.tsv", wide), "w.tsv")[0],
    ]
    assert_matches(published(proc, partials, tmp_path / "out"), pd.concat([long, wide]))


def test_gene_ids_stay_byte_exact(tmp_path: Path) -> None:
    """Gene IDs that look like dates or numbers are published as written, quoted."""
    (tmp_path / "g.csv").write_text(
        "gene,S1,S2\n" + "".join(f"{gene},1,2\n" for gene in TRICKY_GENES)
    )
    proc = processor()
    partial, _ = proc.read(tmp_path / "g.csv", "g.csv")
    out = tmp_path / "out"
    out.mkdir()
    proc.write(proc.merge([partial]), out)
    text = (out / "result.csv").read_text()
    for gene in TRICKY_GENES:
        assert f'\n"{gene}",2,1.5,' in text
    assert sorted(published(proc, [partial], out).index) == sorted(TRICKY_GENES)


def test_bad_values_are_dropped_and_counted(tmp_path: Path) -> None:
    """Missing, non-numeric and infinite values are dropped and counted in the facts."""
    (tmp_path / "x.csv").write_text(
        "gene,sample,expression\n"
        "A,s1,1.0\nA,s2,3.0\nA,s3,NA\nB,s1,high\nB,s2,\nC,s1,inf\n,s1,5\nC,s2,2\n"
    )
    proc = processor()
    partial, facts = proc.read(tmp_path / "x.csv", "x.csv")
    assert facts == {"rows": 8, "rows_dropped": 5, "values_dropped": 5, "genes": 2, "samples": 2,
                     "duplicate_pairs": 0}  # fmt: skip
    result = published(proc, [partial], tmp_path / "out")
    assert result.loc["A", "n"] == 2 and result.loc["A", "mean"] == 2.0
    assert result.loc["C", "n"] == 1 and np.isnan(result.loc["C", "std"])  # n < 2: empty


def test_wide_facts_count_cells(tmp_path: Path) -> None:
    """In wide form a row is dropped only when none of its cells is usable."""
    (tmp_path / "w.tsv").write_text("gene\tS1\tS2\nA\t1\tx\nB\t\t\nC\t2\t3\n")
    _, facts = processor().read(tmp_path / "w.tsv", "w.tsv")
    assert facts == {"rows": 3, "rows_dropped": 1, "values_dropped": 3, "genes": 2, "samples": 2,
                     "duplicate_pairs": 0}  # fmt: skip


def test_merge_is_associative(tmp_path: Path) -> None:
    """merge(a, b, c) equals merge(merge(a, b), c) and merge(a, merge(b, c))."""
    proc = processor()
    a, b, c = (
        proc.read(write_long(tmp_path / f"{i}.csv", long_table(50)), f"{i}.csv")[0]
        for i in range(3)
    )
    at_once = published(proc, [a, b, c], tmp_path / "abc")
    left = published(proc, [proc.merge([a, b]), c], tmp_path / "ab_c")
    right = published(proc, [a, proc.merge([b, c])], tmp_path / "a_bc")
    shuffled = published(proc, [c, a, b], tmp_path / "cab")
    for other in (left, right, shuffled):
        pd.testing.assert_frame_equal(other, at_once, check_exact=False, rtol=1e-12)
    assert proc.merge([b, a]).stats.equals(proc.merge([a, b]).stats)
    assert pickle.loads(pickle.dumps(a)).stats.equals(a.stats)


def test_empty_merge_writes_a_header(tmp_path: Path) -> None:
    """With no partial, result.csv has its header only."""
    proc = processor()
    proc.write(proc.merge([]), tmp_path)
    assert (tmp_path / "result.csv").read_text() == '"gene","n","mean","std","samples"\n'


def test_tables_without_a_usable_value_merge_and_write(tmp_path: Path) -> None:
    """Tables whose every value is missing read (zero genes), and merge alone or with others."""
    (tmp_path / "na.csv").write_text("gene,S1,S2\nTP53,NA,\nBRCA1,x,NaN\n")
    (tmp_path / "good.csv").write_text("gene,S1,S2\nTP53,1,3\n")
    proc = processor()
    empty, facts = proc.read(tmp_path / "na.csv", "na.csv")
    good, _ = proc.read(tmp_path / "good.csv", "good.csv")
    assert facts["genes"] == 0 and facts["rows_dropped"] == 2
    assert published(proc, [empty, empty], tmp_path / "alone").empty
    with_good = published(proc, [empty, good], tmp_path / "with")
    assert with_good["mean"].tolist() == [2.0]
    pd.testing.assert_frame_equal(with_good, published(proc, [good], tmp_path / "only"))


def test_named_gene_column(tmp_path: Path) -> None:
    """Wide form uses the configured gene column."""
    (tmp_path / "w.csv").write_text("symbol,S1,S2\nTP53,1,3\n")
    partial, facts = processor(gene_column="symbol").read(tmp_path / "w.csv", "w.csv")
    assert facts["genes"] == 1 and partial.stats["mean"].tolist() == [2.0]


@pytest.mark.parametrize(
    ("content", "options", "reason"),
    [
        (b"", {}, "empty"),
        (b"gene,sample,expression\n", {}, "empty"),
        (b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR", {}, "bad_table"),
        (b"gene,S1\n\xff\xfe,1\n", {}, "bad_table"),
        (b"gene,S1,S1\nA,1,2\n", {}, "bad_table"),
        (b"gene,S1\nA,1,SECRET-CELL-42\n", {}, "bad_table"),
        (b"symbol,S1\nA,1\n", {}, "missing_gene_column"),
        (b"gene,S1\nA,1\n", {"layout": "long"}, "missing_gene_column"),
        (b"gene\nA\n", {}, "missing_gene_column"),
    ],
    ids=[
        "no-bytes",
        "header-only",
        "binary",
        "not-utf8",
        "duplicate-columns",
        "ragged",
        "no-gene",
        "not-long",
        "no-samples",
    ],
)
def test_bad_tables_quarantine(
    tmp_path: Path, content: bytes, options: dict[str, Any], reason: str
) -> None:
    """Unreadable or ill-shaped tables quarantine with their reason, quoting no cell."""
    (tmp_path / "x.csv").write_bytes(content)
    error = reason_of(processor(**options), tmp_path / "x.csv")
    assert error.reason == reason
    assert "SECRET" not in error.detail and "SECRET" not in str(error)


def test_not_numbers_are_no_numbers_for_pandas() -> None:
    """The cells read as missing on the fast path are ones pandas' to_numeric rejects too."""
    parsed = pd.to_numeric(pd.Series(NOT_NUMBERS, dtype="str"), errors="coerce")
    assert parsed.isna().all()


@pytest.mark.parametrize(
    "junk",
    [["NA", "", "None", "-", "#VALUE!", "inf", "1e400"], ["NA", "", "high", "1_0", "0x1", "nil"]],
    ids=["fast-path", "lenient-path"],
)
def test_odd_cells_count_as_pandas_says(tmp_path: Path, junk: list[str]) -> None:
    """Odd numbers and junk cells, whichever reader takes them, give pandas' values and drops."""
    # Given a wide table mixing odd but valid numbers with cells that are no number
    numbers = ["1", " 2.5", "+3", ".5", "5.", "1e-320", "-0", "7.25E+01", "00012"]
    cells = numbers + junk
    lines = ["gene,S1,S2"] + [f"G{i % 3},{c},{cells[-1 - i]}" for i, c in enumerate(cells)]
    (tmp_path / "w.csv").write_text("\n".join(lines) + "\n")
    # When it is read
    proc = processor()
    partial, facts = proc.read(tmp_path / "w.csv", "w.csv")
    # Then values and drops are what pandas' to_numeric makes of the cells
    wide = pd.read_csv(tmp_path / "w.csv", dtype=str, keep_default_na=False)
    long = wide.melt(id_vars="gene", var_name="sample", value_name="expression")
    long["expression"] = pd.to_numeric(long["expression"], errors="coerce")
    long = long[np.isfinite(long["expression"])]
    assert facts["values_dropped"] == 2 * len(cells) - len(long)
    assert_matches(published(proc, [partial], tmp_path / "out"), long)


def test_wide_rows_of_one_gene_and_shared_samples(tmp_path: Path) -> None:
    """A gene on several rows and sample names shared between files count each sample once."""
    (tmp_path / "a.tsv").write_text("gene\tS2\tS1\nTP53\t1\t2\nTP53\t3\t\nBRCA1\t\t5\n")
    (tmp_path / "b.csv").write_text("gene,S1,S3\nTP53,4,6\nBRCA1,7,\n")
    proc = processor()
    (a, facts), (b, _) = (proc.read(tmp_path / n, n) for n in ("a.tsv", "b.csv"))
    assert facts == {"rows": 3, "rows_dropped": 0, "values_dropped": 2, "genes": 2, "samples": 2,
                     "duplicate_pairs": 0}  # fmt: skip
    result = published(proc, [a, b], tmp_path / "out")
    assert result.loc["TP53", "n"] == 5 and result.loc["TP53", "samples"] == 3
    assert result.loc["BRCA1", "n"] == 2 and result.loc["BRCA1", "samples"] == 1
    assert result.loc["TP53", "mean"] == 3.2


def test_sparse_long_tables_count_samples_exactly(tmp_path: Path) -> None:
    """Many genes by many samples, few pairs (a sort, not a bitmap, finds the distinct pairs)."""
    rng = np.random.default_rng(5)
    tables = [
        pd.DataFrame(
            {
                "gene": [f"G{g}" for g in rng.integers(0, 3000, 4000)],
                "sample": [f"S{s}" for s in rng.integers(0, 3000, 4000)],
                "expression": rng.normal(0.0, 1.0, 4000),
            }
        )
        for _ in range(3)
    ]
    proc = processor()
    parts = [
        proc.read(write_long(tmp_path / f"{i}.csv", t), f"{i}.csv")[0] for i, t in enumerate(tables)
    ]
    merged = proc.merge([proc.merge(parts[:2]), parts[2]])
    assert_matches(published(proc, [merged], tmp_path / "out"), pd.concat(tables))


def test_clean_tables_never_import_pandas(tmp_path: Path) -> None:
    """Reading, merging and writing clean long and wide tables leaves pandas unimported: a fresh
    worker would pay ~0.3 s of CPU for it."""
    write_long(tmp_path / "l.csv", long_table(30))
    write_wide(tmp_path / "w.tsv", long_table(60).drop_duplicates(["gene", "sample"]))
    script = (
        "import sys; from pathlib import Path\n"
        "from daemon.processors.genomics import GenomicsProcessor\n"
        "from daemon.processors.options import GenomicsOptions\n"
        "proc = GenomicsProcessor(GenomicsOptions()); folder = Path(sys.argv[1])\n"
        "parts = [proc.read(folder / n, n)[0] for n in ('l.csv', 'w.tsv')]\n"
        "proc.write(proc.merge(parts), folder)\n"
        "sys.exit('pandas' in sys.modules)\n"
    )
    done = subprocess.run([sys.executable, "-c", script, str(tmp_path)], check=False, timeout=60)
    assert done.returncode == 0
    assert (tmp_path / "result.csv").is_file()

"""The genomics pipeline end to end, through the real service: long and wide expression tables
(CSV and TSV) in, per-gene statistics equal to pandas' on the concatenated table out."""

from __future__ import annotations

import csv

import numpy as np
import pandas as pd

from tests.support.accounting import check_accounting
from tests.support.waiting import wait_until
from tests.system.conftest import MakeService

# IDs that spreadsheets and type inference mangle (into dates, numbers or NaN).
TRICKY_GENES = ["SEPT2", "MARCH1", "1-Mar", "ENSG00000141510.17", "000123"]
GENES = [*TRICKY_GENES, "TP53", "BRCA1"]
RNG = np.random.default_rng(31)


def genomics(**overrides: object) -> dict[str, object]:
    return {
        "name": "genomics",
        "kind": "genomics",
        "max_files": 1000,
        "max_wait": 5,
        "settle_s": 0.1,
        **overrides,
    }


def long_table(samples: list[str], n_rows: int) -> pd.DataFrame:
    return pd.DataFrame(
        {
            "gene": RNG.choice(GENES, n_rows),
            "sample": RNG.choice(samples, n_rows),
            "expression": RNG.lognormal(4.0, 1.0, n_rows),
        }
    )


def wide_table(samples: list[str]) -> pd.DataFrame:
    """One row per gene, one column per sample; a few values missing."""
    values = RNG.normal(50.0, 12.0, (len(GENES), len(samples)))
    values[RNG.random(values.shape) < 0.1] = np.nan
    wide = pd.DataFrame(values, columns=samples)
    wide.insert(0, "gene", GENES)
    return wide


def as_long(wide: pd.DataFrame) -> pd.DataFrame:
    return wide.melt(id_vars="gene", var_name="sample", value_name="expression")


def encoded(table: pd.DataFrame, sep: str) -> bytes:
    # 17 significant digits round-trip: the service reads the very numbers pandas holds here
    return table.to_csv(sep=sep, index=False, float_format="%.17g", na_rep="").encode()


def expected_stats(long: pd.DataFrame) -> pd.DataFrame:
    """What pandas says on the whole concatenated long table (missing values dropped)."""
    kept = long.dropna(subset=["expression"])
    grouped = kept.groupby("gene", sort=True)
    return pd.DataFrame(
        {
            "n": grouped["expression"].count(),
            "mean": grouped["expression"].mean(),
            "std": grouped["expression"].std(ddof=1),
            "samples": grouped["sample"].nunique(),
        }
    )


def test_long_and_wide_tables_give_pandas_statistics(make_service: MakeService) -> None:
    """Long and wide tables, CSV and TSV, in one batch: per-gene n, mean, std and samples equal
    pandas' on the concatenated table; gene IDs come out byte-exact; a bad table is quarantined
    with its reason while the rest of the batch publishes."""
    # Given long and wide tables (CSV and TSV) over the same genes, and two bad tables
    long_csv = long_table(["S1", "S2", "S3"], 200)
    long_tsv = pd.concat(
        [
            long_table(["S4", "S5"], 150),
            pd.DataFrame([["SOLO1", "S9", 7.25]], columns=["gene", "sample", "expression"]),
        ],
        ignore_index=True,
    )
    wide_csv = wide_table(["W1", "W2", "W3", "W4"])
    wide_tsv = wide_table(["T1", "T2", "T3"])  # no (gene, sample) pair in two files
    files = {
        "long.csv": encoded(long_csv, ","),
        "long.tsv": encoded(long_tsv, "\t"),
        "wide.csv": encoded(wide_csv, ","),
        "wide.tsv": encoded(wide_tsv, "\t"),
        "no_gene.csv": b"symbol,S1,S2\nTP53,1.0,2.0\n",
        "ragged.tsv": b"gene\tS1\tS2\nTP53\t1.0\t2.0\tEXTRA\t9\n",
    }
    # One batch, sealed by count alone (a busy machine must not cut it at max_wait)
    service = make_service([genomics(max_files=len(files), max_wait=120)])
    service.start()

    # When they are dropped
    dropped = {name: service.drop("genomics", name, data) for name, data in files.items()}
    wait_until(lambda: service.accounted() == len(files), 45, message="all accounted")
    assert service.stop() == 0

    # Then one batch publishes the four good tables and quarantines the two bad ones
    manifests = service.manifests("genomics")
    assert len(manifests) == 1
    manifest = manifests[0]
    assert sorted(i["name"] for i in manifest["inputs"]) == sorted(files)[:2] + sorted(files)[4:]
    reasons = {q["name"]: q["reason"] for q in service.quarantined("genomics")}
    assert reasons == {"no_gene.csv": "missing_gene_column", "ragged.tsv": "bad_table"}
    batches = {q["name"]: q["batch_id"] for q in service.quarantined("genomics")}
    assert set(batches.values()) == {manifest["batch_id"]}, (batches, manifest["batch_id"])

    # And the statistics equal pandas' on the concatenated table
    concatenated = pd.concat(
        [long_csv, long_tsv, as_long(wide_csv), as_long(wide_tsv)], ignore_index=True
    )
    want = expected_stats(concatenated)
    path = service.outbox / "genomics" / manifest["batch_id"] / "result.csv"
    result = pd.read_csv(
        path, dtype={"gene": str}, keep_default_na=False, na_values={"std": [""]}
    ).set_index("gene")
    assert list(result.columns) == ["n", "mean", "std", "samples"]
    assert list(result.index) == list(want.index)
    assert result["n"].tolist() == want["n"].tolist()
    assert result["samples"].tolist() == want["samples"].tolist()
    np.testing.assert_allclose(result["mean"], want["mean"], rtol=1e-12)
    np.testing.assert_allclose(result["std"], want["std"], rtol=1e-12, equal_nan=True)
    assert np.isnan(result["std"]["SOLO1"])  # one value: no sample std

    # And the gene IDs are byte-exact: text, never numbers or dates
    with path.open(newline="") as fh:
        genes = [row[0] for row in csv.reader(fh)][1:]
    assert sorted(genes) == sorted([*GENES, "SOLO1"])
    raw = path.read_bytes()
    for gene in TRICKY_GENES:
        assert f'"{gene}",'.encode() in raw
    check_accounting(service, dropped)


def test_input_facts_count_rows_and_dropped_values(make_service: MakeService) -> None:
    """Each input's facts in the manifest count its rows, genes and dropped values."""
    wide = wide_table(["A", "B"])
    wide.loc[0, ["A", "B"]] = np.nan  # a row with no usable value
    body = encoded(wide, ",")
    service = make_service([genomics(max_files=1)])
    service.start()
    sha = service.drop("genomics", "one.csv", body)
    manifest = wait_until(lambda: service.manifests("genomics"), 30)[0]
    assert service.stop() == 0

    (facts,) = manifest["inputs"]
    missing = wide[["A", "B"]].isna()
    assert facts["rows"] == len(GENES)
    assert facts["rows_dropped"] == int(missing.all(axis=1).sum()) >= 1
    assert facts["values_dropped"] == int(missing.to_numpy().sum())
    assert facts["genes"] == int((~missing.all(axis=1)).sum())
    assert facts["samples"] == 2
    check_accounting(service, {"one.csv": sha})


def test_tables_without_a_usable_value_publish_an_empty_result(make_service: MakeService) -> None:
    """A batch whose tables hold no usable value publishes a header-only result; it is not a
    failed batch (retried, then every input quarantined)."""
    files = {"na.csv": b"gene,S1,S2\nTP53,NA,\nBRCA1,n/a,NaN\n", "na.tsv": b"gene\tS1\nSEPT2\t\n"}
    service = make_service([genomics(max_files=len(files))])
    service.start()
    dropped = {name: service.drop("genomics", name, data) for name, data in files.items()}
    wait_until(lambda: service.accounted() == len(files), 30, message="all accounted")
    assert service.stop() == 0

    (manifest,) = service.manifests("genomics")
    assert sorted(i["name"] for i in manifest["inputs"]) == sorted(files)
    assert all(i["genes"] == 0 for i in manifest["inputs"])
    path = service.outbox / "genomics" / manifest["batch_id"] / "result.csv"
    assert path.read_text() == '"gene","n","mean","std","samples"\n'
    assert not any(a["event"] == "batch.retried" for a in service.audit())
    check_accounting(service, dropped)


def test_repeated_pairs_across_files_are_reported_and_resolved(make_service: MakeService) -> None:
    """Two files carrying the same (gene, sample) pairs, through three pipelines: "error"
    quarantines the second with its reason, "first" keeps the first file's values, "mean" one
    mean value per pair; each manifest counts the repeats, and the numbers are pandas'."""
    first = pd.DataFrame({"gene": ["TP53", "TP53", "BRCA1"], "sample": ["S1", "S2", "S1"],
                          "expression": [1.0, 2.0, 3.0]})  # fmt: skip
    second = pd.DataFrame({"gene": ["TP53", "BRCA1", "BRCA1"], "sample": ["S2", "S1", "S9"],
                           "expression": [4.0, 5.0, 6.0]})  # fmt: skip
    rules = ("error", "first", "mean")
    service = make_service(
        [genomics(name=rule, max_files=2, duplicate_pairs=rule) for rule in rules]
    )
    service.start()
    dropped: dict[str, str] = {}
    for rule in rules:  # names unique across pipelines, for the accounting
        dropped[f"{rule}-a.csv"] = service.drop(rule, f"{rule}-a.csv", encoded(first, ","))
    # b after a in every batch: a claimed first (two drops a millisecond apart may be taken in
    # one claim step, in either order)
    wait_until(
        lambda: sum(a["event"] == "file.received" for a in service.audit()) == len(rules),
        30,
        message="every a.csv claimed",
    )
    for rule in rules:
        dropped[f"{rule}-b.csv"] = service.drop(rule, f"{rule}-b.csv", encoded(second, ","))
    wait_until(lambda: service.accounted() == 6, 45, message="all accounted")
    assert service.stop() == 0

    def result(rule: str) -> pd.DataFrame:
        (manifest,) = service.manifests(rule)
        path = service.outbox / rule / manifest["batch_id"] / "result.csv"
        return pd.read_csv(path, dtype={"gene": str}).set_index("gene")

    # The batch order (a then b) decides which file is "first"
    inputs = {rule: {i["name"][len(rule) + 1 :]: i for i in service.manifests(rule)[0]["inputs"]}
              for rule in rules}  # fmt: skip
    assert {q["name"]: q["reason"] for q in service.quarantined("error")} == {
        "error-b.csv": "duplicate_pairs"
    }
    assert inputs["error"]["a.csv"]["duplicate_pairs"] == 0
    assert inputs["first"]["b.csv"]["duplicate_pairs"] == 2
    assert inputs["mean"]["b.csv"]["duplicate_pairs"] == 2

    kept_first = pd.concat([first, second[second["sample"] == "S9"]])
    folded = pd.DataFrame({"gene": ["TP53", "TP53", "BRCA1", "BRCA1"],
                           "sample": ["S1", "S2", "S1", "S9"],
                           "expression": [1.0, 3.0, 4.0, 6.0]})  # fmt: skip
    for rule, long in (("error", first), ("first", kept_first), ("mean", folded)):
        want = expected_stats(long)
        got = result(rule)
        assert got["n"].tolist() == want["n"].tolist(), rule
        np.testing.assert_allclose(got["mean"], want["mean"], rtol=1e-12)
        assert got["samples"].tolist() == want["samples"].tolist()
    check_accounting(service, dropped)

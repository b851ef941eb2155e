"""Genomics rollups: `outbox/genomics/_rollup/<period>.csv` equals pandas over every input row so
far (n, mean, std per gene), through a restart, long and wide tables alike; no sample id in it."""

from __future__ import annotations

import json
from typing import Any

import numpy as np
import pandas as pd

from tests.support.accounting import check_accounting
from tests.support.service import Service
from tests.support.waiting import wait_until
from tests.system.conftest import MakeService

# IDs that spreadsheets and type inference mangle, and one a spreadsheet would run.
GENES = ["SEPT2", "MARCH1", "1-Mar", "ENSG00000141510.17", "000123", "TP53", "=HYPERLINK(1)"]
PIPELINE = "genomics"


def genomics(**overrides: object) -> dict[str, object]:
    return {
        "name": PIPELINE,
        "kind": "genomics",
        "max_files": 2,
        "max_wait": 600,
        "settle_s": 0.1,
        "rollup": "all",
        **overrides,
    }


def samples(tag: str, count: int) -> list[str]:
    """Sample ids shaped like patient identifiers: they must never reach the rollup."""
    return [f"PT-{tag}-{k:04d}" for k in range(count)]


def long_table(rng: np.random.Generator, names: list[str], rows: int) -> pd.DataFrame:
    return pd.DataFrame(
        {
            "gene": rng.choice(GENES, rows),
            "sample": rng.choice(names, rows),
            "expression": rng.lognormal(4.0, 1.0, rows),
        }
    )


def wide_table(rng: np.random.Generator, names: list[str]) -> pd.DataFrame:
    """One row per gene, one column per sample, a few values missing."""
    values = rng.normal(50.0, 12.0, (len(GENES), len(names)))
    values[rng.random(values.shape) < 0.1] = np.nan
    wide = pd.DataFrame(values, columns=names)
    wide.insert(0, "gene", GENES)
    return wide


def encoded(table: pd.DataFrame, sep: str) -> bytes:
    # 17 significant digits round-trip: the service reads the very numbers pandas holds here
    return table.to_csv(sep=sep, index=False, float_format="%.17g", na_rep="").encode()


def drop_batch(
    service: Service, rng: np.random.Generator, tag: str, rows: list[pd.DataFrame], sample_tag: str
) -> dict[str, str]:
    """Two files (one batch): a long CSV and a wide TSV, with samples of their own."""
    long = long_table(rng, samples(f"{sample_tag}L", 5), 120)
    wide = wide_table(rng, samples(f"{sample_tag}W", 4))
    if tag == "a":  # a gene with a single value: std undefined, published empty
        long = pd.concat(
            [long, pd.DataFrame([["SOLO1", "PT-solo-0001", 7.25]], columns=long.columns)]
        )
    rows += [long, wide.melt(id_vars="gene", var_name="sample", value_name="expression")]
    return {
        f"{tag}-long.csv": service.drop(PIPELINE, f"{tag}-long.csv", encoded(long, ",")),
        f"{tag}-wide.tsv": service.drop(PIPELINE, f"{tag}-wide.tsv", encoded(wide, "\t")),
    }


def covered(service: Service, period: str = "all") -> list[str]:
    path = service.outbox / PIPELINE / "_rollup" / f"{period}.json"
    return json.loads(path.read_text())["batches"] if path.exists() else []


def published_ids(service: Service) -> list[str]:
    return sorted(m["batch_id"] for m in service.manifests(PIPELINE))


def check_rollup(service: Service, rows: list[pd.DataFrame], period: str = "all") -> None:
    """Per gene n, mean and std equal pandas over every row (within 1e-9); the table names
    exactly the published batches, has no small-cell rule and no sample id."""
    folder = service.outbox / PIPELINE / "_rollup"
    about: dict[str, Any] = json.loads((folder / f"{period}.json").read_text())
    assert about["batches"] == published_ids(service)
    assert (about["pipeline"], about["period"]) == (PIPELINE, period)
    assert about["min_cell_size"] is None and about["statistics"] == ["mean", "std"]
    text = (folder / f"{period}.csv").read_text(encoding="utf-8")
    assert "PT-" not in text, "a sample id in the rollup"
    table = pd.read_csv(
        folder / f"{period}.csv",
        dtype={"gene": str},
        keep_default_na=False,
        na_values={"std": [""]},
    )
    assert list(table.columns) == ["gene", "n", "mean", "std"]
    kept = pd.concat(rows, ignore_index=True).dropna(subset=["expression"])
    want = kept.groupby("gene", sort=True)["expression"].agg(["count", "mean", "std"])
    assert table["gene"].tolist() == sorted(want.index.tolist())  # byte-exact, code point order
    table = table.set_index("gene")
    assert table["n"].tolist() == want["count"].tolist()
    np.testing.assert_allclose(table["mean"], want["mean"], rtol=1e-9)
    np.testing.assert_allclose(table["std"], want["std"], rtol=1e-9)  # NaN (SOLO1) on both


def test_genomics_rollup_is_exact_across_batches_and_a_restart(make_service: MakeService) -> None:
    """Three batches, the service restarted between the first two: the rollup covers all three
    and equals pandas over every row; a (gene, sample) pair of an earlier batch, repeated in a
    later one, is counted again (a rollup merges batch shares and cannot see it)."""
    service = make_service([genomics()])
    rng = np.random.default_rng(146)
    rows: list[pd.DataFrame] = []
    service.start()
    dropped = drop_batch(service, rng, "a", rows, sample_tag="a")
    wait_until(lambda: len(covered(service)) == 1, 60, message="the first batch in the rollup")
    check_rollup(service, rows)
    assert service.stop() == 0

    # When the service restarts and two more batches come, the last with batch a's samples
    service.start()
    for tag, sample_tag, count in (("b", "b", 2), ("c", "a", 3)):
        dropped |= drop_batch(service, rng, tag, rows, sample_tag=sample_tag)
        wait_until(lambda n=count: len(covered(service)) == n, 60, message=f"batch {tag}")
    assert service.stop() == 0

    # Then the rollup covers the three, exactly, published whole and group-readable
    assert len(published_ids(service)) == 3
    check_rollup(service, rows)
    folder = service.outbox / PIPELINE / "_rollup"
    assert sorted(p.name for p in folder.iterdir()) == ["all.csv", "all.json"]
    assert folder.stat().st_mode & 0o777 == 0o750
    assert {p.stat().st_mode & 0o777 for p in folder.iterdir()} == {0o640}
    check_accounting(service, dropped)


def test_genomics_day_rollup_is_named_after_the_utc_day(make_service: MakeService) -> None:
    """`rollup = "day"`: the table is `<YYYY-MM-DD>.csv` of the UTC day of publish."""
    service = make_service([genomics(rollup="day")])
    rng = np.random.default_rng(147)
    rows: list[pd.DataFrame] = []
    service.start()
    dropped = drop_batch(service, rng, "d", rows, sample_tag="d")
    manifest = wait_until(lambda: service.manifests(PIPELINE), 60, message="a batch")[0]
    day = manifest["published_at"][:10]
    wait_until(lambda: covered(service, day), 30, message="the day's rollup")
    assert service.stop() == 0
    assert sorted(p.name for p in (service.outbox / PIPELINE / "_rollup").iterdir()) == [
        f"{day}.csv",
        f"{day}.json",
    ]
    check_rollup(service, rows, period=day)
    check_accounting(service, dropped)

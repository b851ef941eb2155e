"""The EMR pipeline end to end, through the real service."""

from __future__ import annotations

import gzip
import io
import os
import random
import signal

import pandas as pd
import pytest

from daemon.audit import hash_name
from tests.support.accounting import check_accounting
from tests.support.data import emr_csv
from tests.support.waiting import wait_until
from tests.system.conftest import MakeService

NUMERIC = ["age", "systolic_bp", "glucose"]


def emr(**overrides: object) -> dict[str, object]:
    return {
        "name": "emr",
        "kind": "emr",
        "max_files": 1000,
        "max_wait": 30,
        "settle_s": 0.1,
        **overrides,
    }


def expected_means(contents: list[bytes]) -> pd.DataFrame:
    frame = pd.concat(
        [pd.read_csv(io.BytesIO(c), dtype={"patient_id": str}) for c in contents]
    ).dropna()
    grouped = frame.groupby("diagnosis")
    result = grouped[NUMERIC].mean().add_prefix("mean_")
    result.insert(0, "n", grouped.size())
    return result.reset_index()


def test_dropped_files_publish_one_batch_with_exact_means(make_service: MakeService) -> None:
    """Files dropped into a running service come out as one batch whose means equal pandas'."""
    service = make_service([emr(max_files=8)])
    service.start()
    rng = random.Random(1)
    contents = [emr_csv(rng, rows=40, missing_every=7) for _ in range(8)]
    dropped = {
        f"visit{i}.csv": service.drop("emr", f"visit{i}.csv", c) for i, c in enumerate(contents)
    }

    manifest = wait_until(lambda: service.manifests("emr"), 30)[0]
    assert service.stop() == 0

    assert sorted(i["name"] for i in manifest["inputs"]) == sorted(dropped)
    # Per-file counts are rounded down to a multiple of min_cell_size (11): 40 → 33, 6 → 0.
    assert all(
        (i["rows"], i["rows_dropped"], i["rounded_to"]) == (33, 0, 11) for i in manifest["inputs"]
    )
    result = pd.read_csv(service.outbox / "emr" / manifest["batch_id"] / "result.csv")
    expected = expected_means(contents)
    assert list(result.columns) == [
        "diagnosis", "n", *[f"mean_{c}" for c in NUMERIC], "suppressed"
    ]  # fmt: skip
    assert not result.pop("suppressed").any()
    pd.testing.assert_frame_equal(result, expected, check_exact=False, rtol=1e-12)
    assert "patient_id" not in result.columns
    check_accounting(service, dropped)


@pytest.mark.parametrize(
    ("limits", "files", "expected_batches"),
    [
        ({"max_files": 3}, [200] * 7, [3, 3, 1]),
        ({"max_bytes": 5000}, [1500] * 5, [3, 2]),
    ],
    ids=["max_files", "max_bytes"],
)
def test_count_and_size_limits_seal_batches(
    make_service: MakeService, limits: dict[str, int], files: list[int], expected_batches: list[int]
) -> None:
    """`max_files` and `max_bytes` each seal a batch; the rest waits for `max_wait`."""
    service = make_service([emr(max_wait=2, **limits)], workers={"count": 1})
    service.start()
    dropped = {}
    for i, size in enumerate(files):
        body = f"diagnosis,age\nx,{i:03d}\n".encode() + b"a,1\n" * ((size - 20) // 4)
        dropped[f"f{i}.csv"] = service.drop("emr", f"f{i}.csv", body)
        # One at a time, so the sealing order is the drop order.
        wait_until(lambda i=i: service.journal("SELECT count(*) FROM files")[0][0] > i, 10)
    wait_until(lambda: sum(len(m["inputs"]) for m in service.manifests()) == len(files), 30)
    assert service.stop() == 0
    sizes = sorted((len(m["inputs"]) for m in service.manifests()), reverse=True)
    assert sizes == expected_batches
    check_accounting(service, dropped)


def test_max_wait_seals_a_partial_batch(make_service: MakeService) -> None:
    """A batch below every limit seals `max_wait` seconds after its first file arrived."""
    service = make_service([emr(max_wait=2)])
    service.start()
    sha = service.drop("emr", "one.csv", emr_csv(random.Random(2)))
    manifest = wait_until(lambda: service.manifests("emr"), 15)[0]
    assert service.stop() == 0
    waited = (
        pd.Timestamp(manifest["sealed_at"]) - pd.Timestamp(manifest["inputs"][0]["received_at"])
    ).total_seconds()
    assert 1.9 <= waited <= 3.5
    check_accounting(service, {"one.csv": sha})


def test_run_once_drains_the_inbox_and_exits_zero(make_service: MakeService) -> None:
    """`run --once` takes every file present, publishes all of it, and exits 0."""
    service = make_service([emr(max_files=10)])
    rng = random.Random(3)
    dropped = {f"f{i}.csv": service.drop("emr", f"f{i}.csv", emr_csv(rng)) for i in range(25)}
    dropped["broken.csv"] = service.drop("emr", "broken.csv", b"\x00\x01binary junk")

    done = service.run("run", "--once")

    assert done.returncode == 0, done.stderr
    assert len(service.manifests("emr")) == 3
    assert [q["name"] for q in service.quarantined()] == ["broken.csv"]
    check_accounting(service, dropped)


def test_sigterm_mid_batch_then_restart_accounts_for_everything(make_service: MakeService) -> None:
    """SIGTERM while batches run: the service exits 0; after a restart every input is in
    exactly one published manifest and nothing is left in the spool."""
    service = make_service([emr(max_files=20, max_wait=1)])
    service.start()
    rng = random.Random(4)
    dropped = {}
    for i in range(120):
        dropped[f"f{i}.csv"] = service.drop("emr", f"f{i}.csv", emr_csv(rng, rows=200))
    wait_until(lambda: any(a["event"] == "batch.started" for a in service.audit()), 20)

    assert service.stop() == 0
    service.start()
    wait_until(lambda: service.accounted() == len(dropped), 60, message="all accounted")
    assert service.stop() == 0
    check_accounting(service, dropped)


def test_bad_config_exits_78_naming_the_key(make_service: MakeService) -> None:
    """A typo in the config is refused with exit status 78 and the key's name."""
    service = make_service([emr(max_filez=3)])
    for command in (["check-config"], ["run"]):
        done = service.run(*command, timeout_s=30)
        assert done.returncode == 78
        assert "pipeline[0].max_filez" in done.stderr


def test_symlink_and_fifo_are_rejected_never_read(make_service: MakeService) -> None:
    """A symlink and a FIFO in the inbox are reported once as rejected and left alone; the
    service keeps publishing."""
    service = make_service([emr(max_files=1)])
    secret = service.root / "secret.csv"
    secret.write_text("diagnosis,age\nsecret,1\n")
    (service.inbox / "emr").mkdir(parents=True)
    (service.inbox / "emr" / "link.csv").symlink_to(secret)
    fifo = service.inbox / "emr" / "pipe.csv"
    os.mkfifo(fifo)
    service.start()
    sha = service.drop("emr", "good.csv", emr_csv(random.Random(5)))
    wait_until(lambda: service.manifests("emr"), 20)
    service.signal(signal.SIGHUP)  # a reload rescans: still reported only once
    wait_until(lambda: any(a["event"] == "config.reloaded" for a in service.audit()), 10)
    assert service.stop() == 0

    rejected = [a for a in service.audit() if a["event"] == "file.rejected"]
    # Refused entries have no journal row to map back from: compare with their keyed hashes.
    key = (service.root / "state" / "audit-name.key").read_bytes()
    assert sorted((a["file"], a["reason"]) for a in rejected) == sorted(
        [(hash_name(key, "link.csv"), "symlink"), (hash_name(key, "pipe.csv"), "fifo")]
    )
    assert (service.inbox / "emr" / "link.csv").is_symlink()
    assert fifo.exists()
    assert "secret" not in "".join(str(m) for m in service.manifests())
    check_accounting(service, {"good.csv": sha})


def european_export(rng: random.Random) -> pd.DataFrame:
    """Rows of a Windows export: accented labels, a lab column with censored values."""
    rows = []
    for _ in range(60):
        crp = rng.choice(["<0.5", f"{rng.uniform(0.5, 90):.2f}", f"{rng.uniform(0.5, 90):.2f}"])
        rows.append(
            {
                "Diagnose": rng.choice(["Fièvre", "Grippe", "Bronchite"]),
                "Station": rng.choice(["Nord", "Süd"]),
                "temp": round(rng.uniform(36, 41), 1),
                "crp": crp,
            }
        )
    return pd.DataFrame(rows)


def test_real_exports_give_the_chosen_statistics(make_service: MakeService) -> None:
    """A cp1252 `;` export with decimal commas and censored `<0.5` values, an .xlsx and a
    gzip CSV in one batch: mean, std, median and p90 over each column's own values equal
    pandas'; the censored values are counted in the manifest, never silently dropped."""
    import openpyxl

    rng = random.Random(7)
    frames = [european_export(rng) for _ in range(3)]
    service = make_service(
        [
            emr(
                max_files=3,
                group_by="Diagnose",
                category_columns=["Station"],
                encoding="auto",
                decimal=",",
                statistics=["mean", "std", "median", "p90"],
                missing="column",
            )
        ]
    )
    service.start()
    # Given a cp1252 `;` CSV with decimal commas, an .xlsx, and a gzip CSV
    text = frames[0].to_csv(sep=";", index=False, decimal=",", lineterminator="\r\n")
    book = openpyxl.Workbook()
    sheet = book.active
    sheet.append(list(frames[1].columns))
    for row in frames[1].itertuples(index=False):
        sheet.append(list(row))
    xlsx = io.BytesIO()
    book.save(xlsx)
    dropped = {
        "export.csv": service.drop("emr", "export.csv", text.encode("cp1252")),
        "export.xlsx": service.drop("emr", "export.xlsx", xlsx.getvalue()),
        "export.csv.gz": service.drop(
            "emr", "export.csv.gz", gzip.compress(frames[2].to_csv(index=False).encode())
        ),
    }
    # When the batch is published
    manifest = wait_until(lambda: service.manifests("emr"), 60)[0]
    assert service.stop() == 0
    # Then every statistic equals pandas over the three tables' own values per column
    result = pd.read_csv(service.outbox / "emr" / manifest["batch_id"] / "result.csv")
    result = result.set_index("Diagnose").sort_index()
    frame = pd.concat(frames)
    frame["crp"] = pd.to_numeric(frame["crp"], errors="coerce")
    grouped = frame.groupby("Diagnose")
    for column in ("temp", "crp"):
        values = grouped[column]
        expected = {
            f"n_{column}": values.count(),
            f"mean_{column}": values.mean(),
            f"std_{column}": values.std(),
            f"median_{column}": values.median(),
            f"p90_{column}": values.quantile(0.9),
        }
        for name, want in expected.items():
            pd.testing.assert_series_equal(
                result[name], want.rename(name).astype(float), check_dtype=False, rtol=1e-12
            )
    assert "mean_Station" not in result.columns and not result["suppressed"].any()
    censored = {i["name"]: i.get("unparsed:crp", 0) for i in manifest["inputs"]}
    # Counted per file, rounded up to a multiple of min_cell_size (11) like every per-file count.
    assert censored == {
        name: -(-int((f["crp"] == "<0.5").sum()) // 11) * 11
        for name, f in zip(dropped, frames, strict=True)
    }
    assert all(censored.values())
    check_accounting(service, dropped)

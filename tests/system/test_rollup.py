"""Rollups: `outbox/<pipeline>/_rollup/<period>.csv` equals pandas over every input row so far,
through restarts and kill -9, each batch counted exactly once (the covered ids say which)."""

from __future__ import annotations

import io
import json
import random
import signal
import time
from typing import Any

import numpy as np
import pandas as pd

from tests.support.accounting import check_accounting
from tests.support.data import emr_csv
from tests.support.service import Service
from tests.support.waiting import wait_until
from tests.system.conftest import MakeService

VALUES = ["age", "systolic_bp", "glucose"]
STATISTICS = ["mean", "std", "min", "max"]
MIN_CELL = 5


def emr(**overrides: object) -> dict[str, object]:
    return {
        "name": "emr",
        "kind": "emr",
        "max_files": 2,
        "max_wait": 600,
        "settle_s": 0.1,
        "rollup": "all",
        "statistics": ["n", *STATISTICS, "median"],
        "min_cell_size": MIN_CELL,
        **overrides,
    }


def rare_rows(rng: random.Random, rows: int) -> bytes:
    """A group too small for the rollup ("rare", `rows` rows in all)."""
    lines = ["patient_id,diagnosis,age,systolic_bp,glucose"]
    lines += [f"{rng.randint(0, 999999):06d},rare,{rng.randint(1, 99)},120.5,7.25"] * rows
    return ("\n".join(lines) + "\n").encode()


def expected(contents: list[bytes]) -> tuple[pd.DataFrame, pd.Series, set[str]]:
    """Per group over all rows (rows with a missing value dropped), pandas' way; and the groups
    small-cell suppression must hide (a lone small cell takes the next smallest with it)."""
    frame = pd.concat(
        [pd.read_csv(io.BytesIO(c), dtype={"patient_id": str}) for c in contents]
    ).dropna()
    grouped = frame.groupby("diagnosis")[VALUES]
    table = grouped.agg(["count", *STATISTICS])
    sizes = frame.groupby("diagnosis").size()
    small = {g for g, n in sizes.items() if n < MIN_CELL}
    if len(small) == 1:
        small.add(str(sizes.drop(list(small)).idxmin()))
    return table, sizes, small


def rollup(service: Service, period: str = "all") -> tuple[pd.DataFrame, dict[str, Any]]:
    folder = service.outbox / "emr" / "_rollup"
    about = json.loads((folder / f"{period}.json").read_text())
    return pd.read_csv(folder / f"{period}.csv", keep_default_na=False, na_values=[""]), about


def covered(service: Service, period: str = "all") -> list[str]:
    path = service.outbox / "emr" / "_rollup" / f"{period}.json"
    return json.loads(path.read_text())["batches"] if path.exists() else []


def published_ids(service: Service) -> list[str]:
    return sorted(m["batch_id"] for m in service.manifests("emr"))


def check_rollup(service: Service, contents: list[bytes], period: str = "all") -> None:
    """The rollup equals pandas over every input (within 1e-9), suppresses small cells, and
    names exactly the published batches."""
    table, about = rollup(service, period)
    assert about["batches"] == published_ids(service)
    assert about["period"] == period and about["pipeline"] == "emr"
    want, sizes, small = expected(contents)
    columns = ["diagnosis", "n"]
    for c in VALUES:
        columns += [f"n_{c}", *(f"{s}_{c}" for s in STATISTICS)]
    assert list(table.columns) == [*columns, "suppressed"]
    hidden = table[table["suppressed"]]
    assert len(hidden) == len(small)
    assert hidden.drop(columns="suppressed").isna().all().all(), "a suppressed cell shows a value"
    shown = table[~table["suppressed"]].set_index("diagnosis")
    assert set(shown.index) == set(want.index) - small
    for group, row in shown.iterrows():
        assert row["n"] == sizes[group]
        for c in VALUES:
            assert row[f"n_{c}"] == want.loc[group, (c, "count")]
            for s in STATISTICS:
                np.testing.assert_allclose(
                    row[f"{s}_{c}"], want.loc[group, (c, s)], rtol=1e-9, err_msg=f"{group} {s}_{c}"
                )


def drop_batch(
    service: Service, rng: random.Random, tag: str, contents: list[bytes]
) -> dict[str, str]:
    """Two files (one batch): random visits, one with a few rows of the rare group."""
    dropped = {}
    for i, data in enumerate((emr_csv(rng, rows=40, missing_every=9), rare_rows(rng, 1))):
        contents.append(data)
        dropped[f"{tag}-{i}.csv"] = service.drop("emr", f"{tag}-{i}.csv", data)
    return dropped


def test_rollup_is_exact_across_batches_and_a_restart(make_service: MakeService) -> None:
    """Three batches, the service restarted between them: the rollup covers all three and
    equals pandas over every input row; its files are published whole, group-readable."""
    service = make_service([emr()])
    rng = random.Random(143)
    contents: list[bytes] = []
    dropped: dict[str, str] = {}
    service.start()
    dropped |= drop_batch(service, rng, "a", contents)
    wait_until(lambda: len(covered(service)) == 1, 60, message="the first batch in the rollup")
    check_rollup(service, contents)
    assert service.stop() == 0

    # When the service restarts and two more batches come
    service.start()
    for tag in ("b", "c"):
        dropped |= drop_batch(service, rng, tag, contents)
        wait_until(lambda: len(covered(service)) == len(contents) // 2, 60, message="rollup")
    assert service.stop() == 0

    # Then the rollup covers the three, exactly
    assert len(published_ids(service)) == 3
    check_rollup(service, contents)
    folder = service.outbox / "emr" / "_rollup"
    assert sorted(p.name for p in folder.iterdir()) == ["all.csv", "all.json"]
    assert folder.stat().st_mode & 0o777 == 0o750
    assert {p.stat().st_mode & 0o777 for p in folder.iterdir()} == {0o640}
    check_accounting(service, dropped)


def test_kill_right_after_publish_counts_each_batch_once(make_service: MakeService) -> None:
    """kill -9 (service and workers) the instant a batch folder appears, before or after the
    journal hears of it, and once with the main process stopped while its worker publishes:
    after the restarts the rollup covers every published batch exactly once, exact."""
    service = make_service([emr()])
    rng = random.Random(144)
    contents: list[bytes] = []
    dropped: dict[str, str] = {}
    for round_ in range(4):
        known = set(published_ids(service))
        service.start()
        if round_ == 3:  # the batch must reach a worker, not wait in the main process for one
            wait_until(lambda: len(service.worker_pids()) == 2, 30, message="the workers up")
        dropped |= drop_batch(service, rng, f"k{round_}", contents)
        if round_ == 3:
            # The main process cannot commit: its worker publishes, then the service dies.
            wait_until(lambda k=known: started_since(service, k), 30, message="batch.started")
            service.signal(signal.SIGSTOP)
        wait_until(lambda k=known: set(published_ids(service)) - k, 30, message="a new folder")
        time.sleep(rng.uniform(0.0, 0.05) if round_ % 2 else 0.0)
        service.kill_all()
    service.start()
    wait_until(lambda: service.accounted() == len(dropped), 60, message="all accounted")
    wait_until(lambda: covered(service) == published_ids(service), 30, message="rollup caught up")
    assert service.stop() == 0

    assert len(published_ids(service)) == 4
    check_rollup(service, contents)
    check_accounting(service, dropped)


def started_since(service: Service, known: set[str]) -> bool:
    return any(
        a["event"] == "batch.started" and a["batch_id"] not in known for a in service.audit()
    )


def test_day_rollup_is_named_after_the_utc_day(make_service: MakeService) -> None:
    """`rollup = "day"`: the table is `<YYYY-MM-DD>.csv` of the UTC day of publish."""
    service = make_service([emr(rollup="day")])
    rng = random.Random(145)
    contents: list[bytes] = []
    service.start()
    dropped = drop_batch(service, rng, "d", contents)
    manifest = wait_until(lambda: service.manifests("emr"), 60, message="a batch")[0]
    day = manifest["published_at"][:10]
    wait_until(lambda: covered(service, day), 30, message="the day's rollup")
    assert service.stop() == 0
    check_rollup(service, contents, period=day)
    check_accounting(service, dropped)


def test_rollup_on_a_kind_without_mergeable_statistics_is_refused(
    make_service: MakeService,
) -> None:
    """check-config and run exit 78 naming `rollup` for imaging (rows per image, nothing to
    merge); emr and genomics pipelines keep one."""
    service = make_service([{"name": "imaging", "kind": "imaging", "rollup": "all"}])
    for args in (("check-config",), ("run", "--once")):
        done = service.run(*args)
        assert done.returncode == 78, done.stderr
        assert "pipeline[0].rollup" in done.stderr
        assert "'imaging'" in done.stderr

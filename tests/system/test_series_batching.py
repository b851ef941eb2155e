"""DICOM series as batches, through the real service: `batch_by = "series"` windows instances by
their series (read from the header at claim), sealed once the series is stable for `stable_s`,
across a restart, split by `max_files` without mixing; non-DICOM files go by arrival; the UIDs
appear nowhere outside the worker."""

from __future__ import annotations

import io
from datetime import datetime
from pathlib import Path
from typing import Any

import pandas as pd
from PIL import Image

from tests.support.accounting import check_accounting
from tests.support.dicom import ct_instance, new_uid
from tests.support.service import Service
from tests.support.waiting import wait_until
from tests.system.conftest import MakeService

# The service's tick (0.1 s) and a busy machine: how late a seal may be.
SEAL_SLACK_S = 2.5


def series_pipeline(**overrides: object) -> dict[str, object]:
    return {"name": "ct", "kind": "imaging", "batch_by": "series", "stable_s": 3,
            "max_wait": 120, "max_files": 1000, "settle_s": 0.1, **overrides}  # fmt: skip


def ts(text: str) -> float:
    return datetime.fromisoformat(text.replace("Z", "+00:00")).timestamp()


def drop_received(service: Service, name: str, data: bytes, dropped: dict[str, str]) -> float:
    """Drop a file and wait until it is claimed; its journaled arrival time."""
    dropped[name] = service.drop("ct", name, data)
    sql = "SELECT received_at FROM files WHERE name=? AND state != 'claiming'"
    rows = wait_until(lambda: service.journal(sql, name), 30, message=f"{name} claimed")
    return float(rows[0][0])


def at_least(service: Service, n: int) -> list[dict[str, Any]]:
    """The pipeline's manifests once there are `n` (an empty list before)."""
    found = service.manifests("ct")
    return found if len(found) >= n else []


def inputs_of(manifest: dict[str, Any]) -> list[str]:
    return sorted(i["name"] for i in manifest["inputs"])


def series_table(service: Service, manifest: dict[str, Any]) -> pd.DataFrame:
    return pd.read_csv(service.outbox / "ct" / manifest["batch_id"] / "series.csv")


def assert_no_uid_outside(service: Service, uids: list[str]) -> None:
    """Outbox (results, manifests, audit), stderr and the journal's group keys: no UID."""
    texts = [p.read_bytes() for p in service.outbox.rglob("*") if p.is_file()]
    texts += [p.read_bytes() for p in service.root.glob("stderr-*.log")]
    texts += [str(g).encode() for (g,) in service.journal("SELECT group_key FROM files")]
    for uid in uids:
        assert not any(uid.encode() in t for t in texts), "a UID left the worker"


def test_interleaved_series_make_two_batches_sealed_once_stable(
    make_service: MakeService,
) -> None:
    """Instances of two series dropped alternately over time: exactly two batches, each one
    whole series, each sealed about stable_s after its own last instance."""
    service = make_service([series_pipeline()])
    service.start()
    study, series_a, series_b = new_uid(), new_uid(), new_uid()
    dropped: dict[str, str] = {}
    last: dict[str, float] = {}
    # Given instances alternating between two series, each claimed before the next is dropped
    for i in range(1, 4):
        for label, uid in (("a", series_a), ("b", series_b)):
            name = f"{label}{i}.dcm"
            last[label] = drop_received(service, name, ct_instance(uid, study, i), dropped)
    # Then two batches, one per series
    manifests = wait_until(lambda: at_least(service, 2), 60)
    assert service.stop() == 0
    by_series = {inputs_of(m)[0][0]: m for m in manifests}
    assert len(manifests) == 2 and set(by_series) == {"a", "b"}
    for label, manifest in by_series.items():
        assert inputs_of(manifest) == [f"{label}{i}.dcm" for i in range(1, 4)]
        waited = ts(manifest["sealed_at"]) - last[label]
        assert 3 - 0.5 <= waited <= 3 + SEAL_SLACK_S, f"series {label} sealed after {waited:.1f}s"
        table = series_table(service, manifest)
        assert table[["series", "instances", "frames"]].values.tolist() == [[1, 3, 3]]
    # The audit's batch.sealed names each batch's series by the journal's keyed hash
    sealed = {
        a["batch_id"]: a.get("group") for a in service.audit() if a["event"] == "batch.sealed"
    }
    for manifest in manifests:
        sql = "SELECT DISTINCT group_key FROM files WHERE batch_id=?"
        ((group,),) = service.journal(sql, manifest["batch_id"])
        assert group.startswith("series:") and sealed[manifest["batch_id"]] == group
    groups = service.journal("SELECT name, group_key FROM files ORDER BY name")
    assert len({g for n, g in groups if n.startswith("a")}) == 1
    assert {g for n, g in groups if n.startswith("a")} != {g for n, g in groups if n[0] == "b"}
    assert_no_uid_outside(service, [study, series_a, series_b])
    check_accounting(service, dropped)


def test_restart_in_the_middle_of_a_series_window_keeps_one_batch(
    make_service: MakeService,
) -> None:
    """SIGTERM with two instances of a series waiting, start again, two more arrive: one batch
    of all four, and the first two keep their arrival times (the window keeps its timing)."""
    service = make_service([series_pipeline(stable_s=10)])
    service.start()
    study, series = new_uid(), new_uid()
    dropped: dict[str, str] = {}
    for i in (1, 2):
        drop_received(service, f"s{i}.dcm", ct_instance(series, study, i), dropped)
    before = dict(service.journal("SELECT name, received_at FROM files"))
    # When the service stops in the middle of the window and starts again
    assert service.stop() == 0
    assert service.journal("SELECT count(*) FROM batches") == [(0,)]
    assert {s for (s,) in service.journal("SELECT state FROM files")} == {"received"}
    service.start()
    last = 0.0
    for i in (3, 4):
        last = drop_received(service, f"s{i}.dcm", ct_instance(series, study, i), dropped)
    # Then one batch holds the whole series, sealed stable_s after its last instance
    (manifest,) = wait_until(lambda: service.manifests("ct"), 60)
    assert service.stop() == 0
    assert len(service.manifests("ct")) == 1
    assert inputs_of(manifest) == [f"s{i}.dcm" for i in range(1, 5)]
    assert 10 - 0.5 <= ts(manifest["sealed_at"]) - last <= 10 + SEAL_SLACK_S
    after = dict(service.journal("SELECT name, received_at FROM files"))
    assert {n: after[n] for n in before} == before
    recovered = [a for a in service.audit() if a["event"] == "daemon.recovered"]
    assert [a.get("files_rebatched") for a in recovered] == [2]
    assert series_table(service, manifest)["instances"].tolist() == [4]
    assert_no_uid_outside(service, [study, series])
    check_accounting(service, dropped)


def test_max_files_splits_a_long_series_into_consecutive_batches(
    make_service: MakeService,
) -> None:
    """A series of seven with max_files = 3, another series of two dropped in the middle: the
    long one in batches of 3, 3 and 1 in arrival order, the short one alone; none mixes."""
    service = make_service([series_pipeline(max_files=3, stable_s=2)])
    service.start()
    study, long_uid, short_uid = new_uid(), new_uid(), new_uid()
    dropped: dict[str, str] = {}
    for i in range(1, 8):
        drop_received(service, f"long{i}.dcm", ct_instance(long_uid, study, i), dropped)
        if i in (3, 4):
            drop_received(service, f"short{i}.dcm", ct_instance(short_uid, study, i), dropped)
    manifests = wait_until(
        lambda: (
            sum(len(m["inputs"]) for m in service.manifests("ct")) == 9 and service.manifests("ct")
        ),
        60,
    )
    assert service.stop() == 0
    batches = sorted((inputs_of(m) for m in manifests), key=lambda n: (n[0][0], len(n[0]), n))
    assert batches == [
        ["long1.dcm", "long2.dcm", "long3.dcm"],
        ["long4.dcm", "long5.dcm", "long6.dcm"],
        ["long7.dcm"],
        ["short3.dcm", "short4.dcm"],
    ]
    for manifest in manifests:
        assert len(series_table(service, manifest)) == 1  # one series per batch
    check_accounting(service, dropped)


def test_batch_by_study_keeps_a_studys_series_together(make_service: MakeService) -> None:
    """batch_by = "study": two series of one study in one batch (two rows in series.csv), the
    other study's instance in its own."""
    service = make_service([series_pipeline(batch_by="study", stable_s=2)])
    service.start()
    study, other, first, second = new_uid(), new_uid(), new_uid(), new_uid()
    dropped: dict[str, str] = {}
    for name, series_uid, study_uid, number in [
        ("s1.dcm", first, study, 1), ("x1.dcm", new_uid(), other, 1),
        ("s2.dcm", second, study, 2), ("s3.dcm", first, study, 1),
    ]:  # fmt: skip
        data = ct_instance(series_uid, study_uid, 1, SeriesNumber=number)
        drop_received(service, name, data, dropped)
    manifests = wait_until(lambda: at_least(service, 2), 60)
    assert service.stop() == 0
    by_first = {inputs_of(m)[0]: m for m in manifests}
    assert sorted(by_first) == ["s1.dcm", "x1.dcm"] and len(manifests) == 2
    assert inputs_of(by_first["s1.dcm"]) == ["s1.dcm", "s2.dcm", "s3.dcm"]
    table = series_table(service, by_first["s1.dcm"])
    assert table[["series", "series_number", "instances"]].values.tolist() == [[1, 1, 2], [2, 2, 1]]
    groups = {g for (g,) in service.journal("SELECT group_key FROM files")}
    assert len(groups) == 2 and all(g.startswith("study:") for g in groups)
    assert_no_uid_outside(service, [study, other, first, second])
    check_accounting(service, dropped)


def png_bytes() -> bytes:
    buffer = io.BytesIO()
    Image.new("L", (16, 16), 7).save(buffer, format="PNG")
    return buffer.getvalue()


def test_non_dicom_files_go_by_arrival(make_service: MakeService) -> None:
    """A PNG, a text file named .dcm and a DICOM-looking file with no dataset join the
    "unknown" group, batched by arrival (max_wait) apart from the series; the two bad ones are
    quarantined by the worker as in any imaging pipeline."""
    service = make_service([series_pipeline(stable_s=1, max_wait=6)])
    service.start()
    dropped: dict[str, str] = {}
    first = drop_received(service, "photo.png", png_bytes(), dropped)
    drop_received(service, "notes.dcm", b"not an image\n", dropped)
    drop_received(service, "garbage.dcm", b"\0" * 128 + b"DICM" + b"\x01" * 512, dropped)
    drop_received(service, "ct.dcm", ct_instance(new_uid(), new_uid(), 1), dropped)
    wait_until(lambda: service.accounted() == 4, 60)
    assert service.stop() == 0
    manifests = service.manifests("ct")
    assert sorted(inputs_of(m) for m in manifests) == [["ct.dcm"], ["photo.png"]]
    unknown = next(m for m in manifests if inputs_of(m) == ["photo.png"])
    # The unknown group waited for max_wait from its first file, like an arrival pipeline
    assert 6 - 0.5 <= ts(unknown["sealed_at"]) - first <= 6 + SEAL_SLACK_S
    assert sorted(q["name"] for q in unknown["quarantined"]) == ["garbage.dcm", "notes.dcm"]
    groups = dict(service.journal("SELECT name, group_key FROM files"))
    assert {groups[n] for n in ("photo.png", "notes.dcm", "garbage.dcm")} == {"unknown"}
    assert groups["ct.dcm"].startswith("series:")
    check_accounting(service, dropped)


def test_batch_by_on_another_kind_is_a_config_error(
    make_service: MakeService, tmp_path: Path
) -> None:
    """batch_by on an EMR pipeline, an unknown batch_by, a zero stable_s: `check-config` and
    `run` exit 78 naming the key."""
    cases = [
        ({"name": "emr", "kind": "emr", "batch_by": "series"}, "batch_by"),
        ({"name": "ct", "kind": "imaging", "batch_by": "patient"}, "batch_by"),
        ({"name": "ct", "kind": "imaging", "batch_by": "study", "stable_s": 0}, "stable_s"),
    ]
    for n, (pipeline, key) in enumerate(cases):
        root = tmp_path / f"case{n}"
        root.mkdir()
        service = make_service([pipeline], root=root)
        for command in (("check-config",), ("run",)):
            done = service.run(*command, timeout_s=60)
            assert done.returncode == 78, (command, done.stderr)
            assert f"pipeline[0].{key}" in done.stderr, done.stderr

"""The audit tail the status page shows: ids and events, a name only as its keyed hash."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from daemon.web.audit_tail import safe_reason, tail

BATCH = "20261130T101500Z-emr-1f2e3d4c"
SHA = "ab" * 32


def write(folder: Path, day: str, lines: list[dict[str, object]], tail_bytes: bytes = b"") -> None:
    folder.mkdir(exist_ok=True)
    body = b"".join(json.dumps(line).encode() + b"\n" for line in lines)
    (folder / f"audit-{day}.jsonl").write_bytes(body + tail_bytes)


def test_newest_day_latest_first_and_names_never_raw(tmp_path: Path) -> None:
    """Only the newest day, newest line first; a raw name is dropped, a keyed hash kept; a
    torn last line is skipped."""
    write(tmp_path, "2026-11-29", [{"seq": 1, "event": "daemon.started", "ts": "old"}])
    write(
        tmp_path,
        "2026-11-30",
        [
            {
                "seq": 2,
                "event": "file.received",
                "pipeline": "emr",
                "file": "Doe, John.csv",
                "sha256": SHA,
                "ts": "t2",
            },
            {
                "seq": 3,
                "event": "file.quarantined",
                "pipeline": "emr",
                "batch_id": BATCH,
                "file": "hmac-sha256:" + "c" * 64,
                "reason": "not_text",
                "ts": "t3",
            },
        ],
        tail_bytes=b'{"seq": 4, "event": "file.rec',
    )
    entries = tail(tmp_path)
    assert [e.seq for e in entries] == [3, 2]
    assert entries[1].file is None and entries[1].sha256 == SHA[:12]
    assert entries[0].file == "hmac-sha256:" + "c" * 12
    assert (entries[0].batch_id, entries[0].reason) == (BATCH, "not_text")


def test_a_long_log_gives_the_last_lines_only(tmp_path: Path) -> None:
    write(tmp_path, "2026-11-30", [{"seq": i, "event": "file.received"} for i in range(5000)])
    assert [e.seq for e in tail(tmp_path, 3)] == [4999, 4998, 4997]


def test_missing_folder_is_empty(tmp_path: Path) -> None:
    assert tail(tmp_path / "none") == []


@pytest.mark.parametrize(
    ("value", "shown"),
    [
        ("disk_full", "disk_full"),
        ("", None),
        (None, None),
        ("cannot read /inbox/Doe, John.csv", "other"),
        ("Not_A_Code", "other"),
        (42, "other"),
    ],
)
def test_reasons_are_codes_or_other(value: object, shown: str | None) -> None:
    assert safe_reason(value) == shown


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("pipeline", "../etc"),
        ("batch_id", "Doe John"),
        ("sha256", "Doe John"),
        ("event", "<script>"),
    ],
)
def test_fields_that_are_not_ids_are_dropped(tmp_path: Path, field: str, value: str) -> None:
    write(tmp_path, "2026-11-30", [{"seq": 1, "event": "file.received", field: value}])
    (entry,) = tail(tmp_path)
    assert value not in repr(entry)

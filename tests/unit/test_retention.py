"""Retention of audit days: the checkpoint they leave, and `verify` starting from it."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from daemon.audit import AuditEvent, AuditLog, load_chain_key, verify
from daemon.audit.verify import CHECKPOINT_NAME, checkpoint_mac, log_files
from daemon.config import Settings
from daemon.journal import Journal
from daemon.requeue import is_transient
from daemon.retention import Retention


def settings(root: Path, audit_days: float | None) -> Settings:
    return Settings.model_validate(
        {
            "paths": {key: root / key for key in ("inbox", "outbox", "state", "quarantine")},
            "pipeline": [{"name": "emr", "kind": "emr"}],
            "retention": {"audit_days": audit_days},
        }
    )


@pytest.fixture
def chain(tmp_path: Path) -> Settings:
    """Four days of lines, 3 per day, oldest 5 days ago."""
    config = settings(tmp_path, audit_days=2)
    for days_ago in (5, 4, 3, 0):
        moment = (datetime.now(UTC) - timedelta(days=days_ago)).timestamp()
        with AuditLog(config.paths.audit, clock=lambda m=moment: m) as log:
            for pid in range(3):
                log.append(AuditEvent.DAEMON_STARTED, pid=pid, version="t")
    return config


def retention(config: Settings) -> Retention:
    return Retention(lambda: config, Journal(config.paths.journal))


def test_pruned_days_leave_a_checkpoint_verify_starts_from(chain: Settings) -> None:
    folder = chain.paths.audit
    assert [t.files for t in retention(chain).plan()] == [3]
    assert len(log_files(folder)) == 4, "a plan deletes nothing"
    tallies = retention(chain).step(limit=100)
    assert [(t.kind, t.files) for t in tallies] == [("audit", 3)]
    assert len(log_files(folder)) == 1
    report = verify(folder)
    assert report.ok, report.error
    assert report.from_checkpoint == tallies[0].checkpoint_seq
    recorded = json.loads((folder / CHECKPOINT_NAME).read_text())["checkpoints"]
    assert [c["seq"] for c in recorded] == [3, 6, 9] and report.from_checkpoint == 9


@pytest.mark.parametrize("limit", [1, 2])
def test_a_bounded_step_prunes_oldest_first_and_says_more_is_left(
    chain: Settings, limit: int
) -> None:
    folder = chain.paths.audit
    days = [p.name for p in log_files(folder)]
    pruner = retention(chain)
    pruner.step(limit=limit)
    assert [p.name for p in log_files(folder)] == days[limit:]
    assert pruner.has_more
    assert verify(folder).ok


def test_the_newest_file_is_never_pruned_even_when_everything_is_old(tmp_path: Path) -> None:
    config = settings(tmp_path, audit_days=0)
    moment = (datetime.now(UTC) - timedelta(days=9)).timestamp()
    with AuditLog(config.paths.audit, clock=lambda: moment) as log:
        log.append(AuditEvent.DAEMON_STARTED, pid=1, version="t")
    assert retention(config).step(limit=100) == []
    assert len(log_files(config.paths.audit)) == 1


def test_a_crash_between_checkpoint_and_unlink_still_verifies(chain: Settings) -> None:
    folder = chain.paths.audit
    retention(chain).step(limit=1)
    # A crash after the second day's checkpoint was added but before that day was deleted.
    second = log_files(folder)[0]
    kept = second.read_bytes()
    retention(chain).step(limit=1)
    second.write_bytes(kept)
    report = verify(folder)
    assert report.ok, report.error
    assert report.from_checkpoint == 3


@pytest.mark.parametrize(
    "tamper",
    ["checkpoint hash", "checkpoint seq", "day removed by hand", "checkpoint removed"],
)
def test_tampering_around_a_checkpoint_is_caught(chain: Settings, tamper: str) -> None:
    folder = chain.paths.audit
    retention(chain).step(limit=1)
    path = folder / CHECKPOINT_NAME
    data = json.loads(path.read_text())
    if tamper == "checkpoint hash":
        data["checkpoints"][0]["hash"] = "f" * 64
        path.write_text(json.dumps(data))
    elif tamper == "checkpoint seq":
        data["checkpoints"][0]["seq"] += 1
        path.write_text(json.dumps(data))
    elif tamper == "day removed by hand":
        log_files(folder)[0].unlink()
    else:
        path.unlink()
    report = verify(folder)
    assert not report.ok


@pytest.fixture
def keyed_chain(tmp_path: Path) -> Settings:
    """As `chain`, chained with the service's HMAC key."""
    config = settings(tmp_path, audit_days=2)
    key = load_chain_key(config.paths.state)
    for days_ago in (5, 4, 3, 0):
        moment = (datetime.now(UTC) - timedelta(days=days_ago)).timestamp()
        with AuditLog(config.paths.audit, clock=lambda m=moment: m, chain_key=key) as log:
            for pid in range(3):
                log.append(AuditEvent.DAEMON_STARTED, pid=pid, version="t")
    return config


def _last_seq_and_hash(path: Path) -> tuple[int, str]:
    line = json.loads(path.read_bytes().splitlines()[-1])
    return int(line["seq"]), str(line["hash"])


def test_a_keyed_chain_leaves_signed_checkpoints(keyed_chain: Settings) -> None:
    folder, key = keyed_chain.paths.audit, load_chain_key(keyed_chain.paths.state)
    retention(keyed_chain).step(limit=100)
    recorded = json.loads((folder / CHECKPOINT_NAME).read_text())["checkpoints"]
    assert all(c["mac"] == checkpoint_mac(key, c) for c in recorded)
    report = verify(folder, key=key)
    assert report.ok, report.error
    assert report.from_checkpoint == 9
    assert not verify(folder).ok, "a keyed checkpoint cannot be checked without the key"


@pytest.mark.parametrize("forged_mac", [None, "0" * 64, "wrong key"])
def test_days_deleted_by_hand_behind_a_made_up_checkpoint_fail_verify(
    keyed_chain: Settings, forged_mac: str | None
) -> None:
    """Someone who can write the audit folder, not read the key, deletes the first days and
    writes the checkpoint they would have left: verify names the checkpoint."""
    folder, key = keyed_chain.paths.audit, load_chain_key(keyed_chain.paths.state)
    gone = log_files(folder)[:2]
    seq, digest = _last_seq_and_hash(gone[-1])
    for path in gone:
        path.unlink()
    entry: dict[str, object] = {"seq": seq, "hash": digest, "day": gone[-1].name[6:16]}
    if forged_mac == "wrong key":
        entry["mac"] = checkpoint_mac(b"k" * 32, entry)
    elif forged_mac is not None:
        entry["mac"] = forged_mac
    (folder / CHECKPOINT_NAME).write_text(json.dumps({"checkpoints": [entry]}))
    report = verify(folder, key=key)
    assert not report.ok
    assert report.error is not None and "not signed with the chain key" in report.error


@pytest.mark.parametrize(
    ("values", "expected"),
    [
        ({}, (90.0, None, None)),
        ({"archive_days": 0, "quarantine_days": 30, "journal_days": 1.5}, (0.0, 30.0, 1.5)),
    ],
)
def test_retention_keys_and_their_defaults(
    tmp_path: Path, values: dict[str, float], expected: tuple[float | None, ...]
) -> None:
    config = Settings.model_validate(
        {
            "paths": {key: tmp_path / key for key in ("inbox", "outbox", "state", "quarantine")},
            "pipeline": [{"name": "emr", "kind": "emr", **values}],
        }
    )
    p = config.pipeline[0]
    assert (p.archive_days, p.quarantine_days, p.journal_days) == expected
    assert config.retention.audit_days is None


@pytest.mark.parametrize("key", ["archive_days", "quarantine_days", "journal_days"])
def test_negative_retention_is_refused(tmp_path: Path, key: str) -> None:
    with pytest.raises(ValueError, match=key):
        Settings.model_validate(
            {
                "paths": {k: tmp_path / k for k in ("inbox", "outbox", "state", "quarantine")},
                "pipeline": [{"name": "emr", "kind": "emr", key: -1}],
            }
        )


@pytest.mark.parametrize(
    ("reason", "transient"),
    [
        ("worker_crash", True),
        ("timeout", True),
        ("disk_full", True),
        ("executor_unavailable", True),
        ("not_utf8", False),
        ("too_large", False),
        ("symlink", False),
        ("not_cp1252", False),
        (None, False),
    ],
)
def test_only_transient_reasons_requeue_without_force(reason: str | None, transient: bool) -> None:
    assert is_transient(reason) is transient

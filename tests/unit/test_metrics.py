"""Metrics: counters follow audit lines, latencies and gauges from the main loop, state gauges."""

from __future__ import annotations

import pytest

from daemon.audit.events import (
    BatchFailed,
    BatchPublished,
    BatchRetried,
    BatchSealed,
    DaemonStarted,
    FileQuarantined,
    FileReceived,
    FileRejected,
    IntakePaused,
    Record,
)
from daemon.errors import ConfigError
from daemon.metrics import MAX_REASONS, Metrics, StateGauges, StateReading, parse_address


@pytest.fixture
def metrics() -> Metrics:
    return Metrics()


def sample(metrics: Metrics, name: str, **labels: str) -> float | None:
    return metrics.registry.get_sample_value(name, labels)


def test_audit_lines_drive_the_counters(metrics: Metrics) -> None:
    """Each counted audit event increments its counter, labelled by pipeline (and reason)."""
    events: list[Record] = [
        DaemonStarted(pid=1, version="x"),
        FileReceived(pipeline="emr", file="a.csv", sha256="0", size=1, file_id=1),
        FileReceived(pipeline="emr", file="b.csv", sha256="0", size=1, file_id=2),
        FileRejected(pipeline="emr", file="l.csv", reason="symlink", size=0),
        FileQuarantined(pipeline="emr", file="q.csv", file_id=3, reason="missing_group_column"),
        BatchPublished(pipeline="emr", batch_id="b1", files=2, quarantined=1, folder="/x"),
        BatchRetried(
            pipeline="imaging", batch_id="b2", attempt=1, reason="worker_crash", delay_s=1.0
        ),
        BatchFailed(pipeline="imaging", batch_id="b2", reason="timeout", attempts=2),
    ]
    for event in events:
        metrics.on_audit(event)

    assert sample(metrics, "medbatch_files_received_total", pipeline="emr") == 2
    assert sample(metrics, "medbatch_files_rejected_total", pipeline="emr", reason="symlink") == 1
    assert (
        sample(
            metrics,
            "medbatch_files_quarantined_total",
            pipeline="emr",
            reason="missing_group_column",
        )
        == 1
    )
    assert sample(metrics, "medbatch_batches_published_total", pipeline="emr") == 1
    assert sample(metrics, "medbatch_batches_retried_total", pipeline="imaging") == 1
    assert (
        sample(metrics, "medbatch_batches_failed_total", pipeline="imaging", reason="timeout") == 1
    )


def test_reason_labels_stay_bounded(metrics: Metrics) -> None:
    """A reason that is not a code (a file name, free text) or past the cap counts as "other"."""
    for reason in ("patient Jane Doe.csv", "Too-Large", "", "x" * 60):
        metrics.file_quarantined("emr", reason)
    assert sample(metrics, "medbatch_files_quarantined_total", pipeline="emr", reason="other") == 4

    for i in range(MAX_REASONS + 5):
        metrics.file_rejected("emr", f"code_{i}")
    series = [
        s
        for family in metrics.registry.collect()
        if family.name == "medbatch_files_rejected"
        for s in family.samples
        if s.name.endswith("_total")
    ]
    reasons = {s.labels["reason"] for s in series}
    assert reasons == {f"code_{i}" for i in range(MAX_REASONS)} | {"other"}
    assert sum(s.value for s in series) == MAX_REASONS + 5


def test_uncounted_events_change_no_counter(metrics: Metrics) -> None:
    """Events without a counter (start, seal, pause) leave every counter at zero."""
    metrics.on_audit(DaemonStarted(pid=1, version="x"))
    metrics.on_audit(IntakePaused(reason="disk_full"))
    metrics.on_audit(BatchSealed(pipeline="emr", batch_id="b", files=1, bytes=1, priority=3))
    assert sample(metrics, "medbatch_files_received_total", pipeline="emr") is None
    assert sample(metrics, "medbatch_batches_published_total", pipeline="emr") is None


def test_batch_latencies_are_observed(metrics: Metrics) -> None:
    """One run time per attempt; one drop-to-publish wait per published input."""
    metrics.batch_finished("emr", 2.0, [10.0, 20.0, 30.0])
    metrics.batch_finished("emr", 1.0)

    assert sample(metrics, "medbatch_batch_run_seconds_count", pipeline="emr") == 2
    assert sample(metrics, "medbatch_batch_run_seconds_sum", pipeline="emr") == 3.0
    assert sample(metrics, "medbatch_drop_to_publish_seconds_count", pipeline="emr") == 3
    assert sample(metrics, "medbatch_drop_to_publish_seconds_sum", pipeline="emr") == 60.0
    bucket = sample(metrics, "medbatch_drop_to_publish_seconds_bucket", pipeline="emr", le="10.0")
    assert bucket == 1


def test_gauges_and_worker_restarts(metrics: Metrics) -> None:
    """Queue depth is set for every priority (missing ones to 0); in flight; restarts count."""
    metrics.set_queue_depth({1: 2, 4: 1})
    metrics.set_queue_depth({4: 3})
    metrics.set_in_flight(2)
    metrics.worker_restarted()

    depths = {p: sample(metrics, "medbatch_queue_depth", priority=str(p)) for p in range(1, 6)}
    assert depths == {1: 0, 2: 0, 3: 0, 4: 3, 5: 0}
    assert sample(metrics, "medbatch_in_flight") == 2
    assert sample(metrics, "medbatch_worker_restarts_total") == 1


def test_each_instance_has_its_own_registry() -> None:
    """Two Metrics (two supervisors in one test process) neither clash nor share counts."""
    first, second = Metrics(), Metrics()
    first.file_received("emr")
    assert sample(first, "medbatch_files_received_total", pipeline="emr") == 1
    assert sample(second, "medbatch_files_received_total", pipeline="emr") is None


def test_state_gauges_are_read_at_scrape_time(metrics: Metrics) -> None:
    """The state gauges show what the reader returns at each scrape, and nothing if it fails."""
    readings: list[StateReading | None] = [
        StateReading(
            is_paused=True,
            free_bytes={"inbox": 10, "outbox": 20},
            oldest_waiting_s={"emr": 4.5, "imaging": 0.0},
            last_publish_ts={"emr": 1_700_000_000.0},
        )
    ]
    metrics.watch_state(lambda: readings[-1])
    assert sample(metrics, "medbatch_intake_paused") == 1
    assert sample(metrics, "medbatch_disk_free_bytes", folder="outbox") == 20
    assert sample(metrics, "medbatch_oldest_waiting_seconds", pipeline="emr") == 4.5
    assert sample(metrics, "medbatch_oldest_waiting_seconds", pipeline="imaging") == 0
    assert sample(metrics, "medbatch_last_publish_timestamp_seconds", pipeline="emr") == 1.7e9
    assert sample(metrics, "medbatch_last_publish_timestamp_seconds", pipeline="imaging") is None
    readings.append(None)
    assert sample(metrics, "medbatch_intake_paused") is None
    assert isinstance(StateGauges(lambda: None).describe().__next__().name, str)


@pytest.mark.parametrize(
    ("address", "expected"),
    [
        ("127.0.0.1:9464", ("127.0.0.1", 9464)),
        ("localhost:9464", ("127.0.0.1", 9464)),
        ("[::1]:9464", ("::1", 9464)),
    ],
)
def test_parse_address(address: str, expected: tuple[str, int]) -> None:
    """host:port with an IP literal (or localhost), IPv6 in brackets."""
    assert parse_address(address) == expected


@pytest.mark.parametrize("address", ["9464", "metrics.example.org:9464", "1.2.3:80", "::1:80"])
def test_bad_address_names_the_key(address: str) -> None:
    """A malformed address is a ConfigError naming service.metrics_address."""
    with pytest.raises(ConfigError, match=r"^service\.metrics_address: "):
        parse_address(address)


def test_port_out_of_range() -> None:
    with pytest.raises(ConfigError, match="out of range"):
        parse_address("127.0.0.1:70000")

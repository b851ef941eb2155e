"""Prometheus metrics: counters, gauges and histograms in a registry of their own.

The main loop updates counters and histograms; the state gauges are computed at scrape time in
the HTTP thread (`daemon.web.server`). Label values are pipeline names (from the config), folder
roles and reason codes, so the number of series stays bounded; a file name never becomes a label.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from daemon import config
from daemon.audit.events import (
    BatchFailed,
    BatchPublished,
    BatchRetried,
    FileQuarantined,
    FileReceived,
    FileRejected,
    Record,
)
from daemon.errors import ConfigError, MedbatchError

PRIORITIES = range(1, 6)
OTHER_REASON = "other"
# Reason codes are short snake_case words (`too_large`, `worker_crash`, `missing_group_column`);
# anything else, and any code past the cap, is counted as "other".
_REASON_CODE = re.compile(r"^[a-z][a-z0-9_]{0,47}$")
MAX_REASONS = 32
BATCH_RUN_BUCKETS_S = (0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600, 1800)
DROP_TO_PUBLISH_BUCKETS_S = (0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600, 1800, 3600, 7200)


class MetricsServerError(MedbatchError):
    """The metrics endpoint could not listen (the address is in use?)."""


class Metrics:
    """Counters follow the audit log (`on_audit`), so a metric never disagrees with the audit
    trail; latencies, queue depth, in-flight and worker restarts are reported by the main loop."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self._reasons: set[str] = set()
        self._add_counters(self.registry)
        self._add_gauges(self.registry)
        self.set_queue_depth({})

    def _add_counters(self, r: CollectorRegistry) -> None:
        self._received = Counter(
            "medbatch_files_received", "Files claimed from an inbox.", ["pipeline"], registry=r
        )
        self._received_by: dict[str, Counter] = {}
        self._rejected = Counter(
            "medbatch_files_rejected",
            "Inbox entries refused unread (symlink, FIFO, too large …).",
            ["pipeline", "reason"],
            registry=r,
        )
        self._quarantined = Counter(
            "medbatch_files_quarantined",
            "Inputs moved to quarantine.",
            ["pipeline", "reason"],
            registry=r,
        )
        self._published = Counter(
            "medbatch_batches_published", "Batches published.", ["pipeline"], registry=r
        )
        self._failed = Counter(
            "medbatch_batches_failed",
            "Batches given up on (their inputs quarantined).",
            ["pipeline", "reason"],
            registry=r,
        )
        self._retried = Counter(
            "medbatch_batches_retried",
            "Batch attempts that failed and were retried.",
            ["pipeline"],
            registry=r,
        )
        self._worker_restarts = Counter(
            "medbatch_worker_restarts", "Worker processes lost and replaced.", registry=r
        )

    def _add_gauges(self, r: CollectorRegistry) -> None:
        self._queue_depth = Gauge(
            "medbatch_queue_depth",
            "Sealed batches waiting for a worker, by priority (1 = most urgent).",
            ["priority"],
            registry=r,
        )
        self._in_flight = Gauge("medbatch_in_flight", "Batches running now.", registry=r)
        self._batch_run = Histogram(
            "medbatch_batch_run_seconds",
            "Time from a batch's start on a worker to its outcome.",
            ["pipeline"],
            buckets=BATCH_RUN_BUCKETS_S,
            registry=r,
        )
        self._drop_to_publish = Histogram(
            "medbatch_drop_to_publish_seconds",
            "Time from a file's arrival to the publication of its batch.",
            ["pipeline"],
            buckets=DROP_TO_PUBLISH_BUCKETS_S,
            registry=r,
        )

    # -- counters, from the audit log ---------------------------------------------------------

    def on_audit(self, event: Record) -> None:
        """AuditLog listener: count the events that have a counter."""
        match event:
            case FileReceived(pipeline=pipeline):
                self.file_received(pipeline)
            case FileRejected(pipeline=pipeline, reason=reason):
                self.file_rejected(pipeline, reason)
            case FileQuarantined(pipeline=pipeline, reason=reason):
                self.file_quarantined(pipeline, reason)
            case BatchPublished(pipeline=pipeline):
                self.batch_published(pipeline)
            case BatchFailed(pipeline=pipeline, reason=reason):
                self.batch_failed(pipeline, reason)
            case BatchRetried(pipeline=pipeline):
                self.batch_retried(pipeline)
            case _:
                pass

    def file_received(self, pipeline: str) -> None:
        # Once per claimed file: the labelled child is looked up once per pipeline.
        child = self._received_by.get(pipeline)
        if child is None:
            child = self._received_by[pipeline] = self._received.labels(pipeline)
        child.inc()

    def file_rejected(self, pipeline: str, reason: str) -> None:
        self._rejected.labels(pipeline, self._reason(reason)).inc()

    def file_quarantined(self, pipeline: str, reason: str) -> None:
        self._quarantined.labels(pipeline, self._reason(reason)).inc()

    def batch_published(self, pipeline: str) -> None:
        self._published.labels(pipeline).inc()

    def batch_failed(self, pipeline: str, reason: str) -> None:
        self._failed.labels(pipeline, self._reason(reason)).inc()

    def batch_retried(self, pipeline: str) -> None:
        self._retried.labels(pipeline).inc()

    # -- what the main loop reports ---------------------------------------------------------

    def batch_finished(
        self, pipeline: str, run_s: float, drop_to_publish_s: Iterable[float] = ()
    ) -> None:
        """An attempt ended after `run_s`; a published one gives each input's wait too."""
        self._batch_run.labels(pipeline).observe(max(run_s, 0.0))
        latency = self._drop_to_publish.labels(pipeline)
        for seconds in drop_to_publish_s:
            latency.observe(max(seconds, 0.0))

    def worker_restarted(self) -> None:
        self._worker_restarts.inc()

    def set_queue_depth(self, by_priority: dict[int, int]) -> None:
        """Waiting batches per priority; priorities not given are set to 0."""
        for priority in PRIORITIES:
            self._queue_depth.labels(str(priority)).set(by_priority.get(priority, 0))

    def set_in_flight(self, n: int) -> None:
        self._in_flight.set(n)

    def watch_state(self, read: Callable[[], StateReading | None]) -> None:
        """Gauges of the service's state, computed by `read` at each scrape (in the HTTP
        thread), so the main loop never updates them and a slow disk never stalls it."""
        self.registry.register(StateGauges(read))

    def _reason(self, reason: str) -> str:
        if not _REASON_CODE.fullmatch(reason):
            return OTHER_REASON
        if reason not in self._reasons:
            if len(self._reasons) >= MAX_REASONS:
                return OTHER_REASON
            self._reasons.add(reason)
        return reason


@dataclass(frozen=True, slots=True)
class StateReading:
    """What the state gauges show, read from the journal and the filesystems."""

    is_paused: bool
    free_bytes: Mapping[str, int]  # by folder role: inbox, state, outbox, quarantine
    oldest_waiting_s: Mapping[str, float]  # by pipeline; 0 when nothing waits
    last_publish_ts: Mapping[str, float]  # by pipeline; absent until its first publish


class StateGauges(Collector):
    """Intake paused, disk free per folder, oldest waiting file, last publish per pipeline."""

    def __init__(self, read: Callable[[], StateReading | None]) -> None:
        self._read = read

    def describe(self) -> Iterator[Metric]:
        return iter(self._families())

    def collect(self) -> Iterator[Metric]:
        reading = self._read()
        paused, free, oldest, last = self._families()
        if reading is not None:
            paused.add_metric([], 1.0 if reading.is_paused else 0.0)
            for folder, n in sorted(reading.free_bytes.items()):
                free.add_metric([folder], float(n))
            for pipeline, age in sorted(reading.oldest_waiting_s.items()):
                oldest.add_metric([pipeline], age)
            for pipeline, ts in sorted(reading.last_publish_ts.items()):
                last.add_metric([pipeline], ts)
        return iter((paused, free, oldest, last))

    @staticmethod
    def _families() -> tuple[GaugeMetricFamily, ...]:
        return (
            GaugeMetricFamily(
                "medbatch_intake_paused", "1 while intake is paused (disk full, audit unwritable)."
            ),
            GaugeMetricFamily(
                "medbatch_disk_free_bytes",
                "Bytes free (for an unprivileged writer) on the filesystem of each folder.",
                labels=["folder"],
            ),
            GaugeMetricFamily(
                "medbatch_oldest_waiting_seconds",
                "Age of the oldest file taken but not yet published or quarantined.",
                labels=["pipeline"],
            ),
            GaugeMetricFamily(
                "medbatch_last_publish_timestamp_seconds",
                "Unix time of the pipeline's last published batch.",
                labels=["pipeline"],
            ),
        )


def parse_address(address: str) -> tuple[str, int]:
    """The config's rule (`config.parse_address`), as a ConfigError naming the key."""
    try:
        return config.parse_address(address)
    except ValueError as exc:
        raise ConfigError("service.metrics_address", str(exc)) from None

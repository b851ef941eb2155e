"""Prometheus metrics: counters, gauges and histograms in a registry of their own.

Updated by the main loop only; `serve` starts prometheus-client's HTTP server thread, which only
reads the registry. Label values are pipeline names (from the config) and reason codes, so the
number of series stays bounded; a file name never becomes a label.
"""

from __future__ import annotations

import ipaddress
import re
import threading
from collections.abc import Iterable
from wsgiref.simple_server import WSGIServer

import structlog
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

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

log = structlog.get_logger()

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
        self._server: WSGIServer | None = None
        self._thread: threading.Thread | None = None
        self._reasons: set[str] = set()
        self._add_counters(self.registry)
        self._add_gauges(self.registry)
        self.set_queue_depth({})

    def _add_counters(self, r: CollectorRegistry) -> None:
        self._received = Counter(
            "medbatch_files_received", "Files claimed from an inbox.", ["pipeline"], registry=r
        )
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
        self._received.labels(pipeline).inc()

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

    # -- the endpoint ---------------------------------------------------------------------

    def serve(self, address: str) -> tuple[str, int]:
        """Serve /metrics on `host:port` (`[::1]:9464` for IPv6); return the bound address."""
        host, port = parse_address(address)
        if not ipaddress.ip_address(host).is_loopback:
            log.warning("metrics.not_loopback", address=address)
        try:
            self._server, self._thread = start_http_server(port, host, registry=self.registry)
        except OSError as exc:
            # Not a ConfigError (exit 78 stops systemd's restarts): the port may free up.
            raise MetricsServerError(
                f"metrics: cannot listen on {address}: {exc.strerror}"
            ) from None
        bound = self._server.server_address
        log.info("metrics.serving", host=host, port=bound[1])
        return host, int(bound[1])

    def close(self) -> None:
        """Stop the HTTP server, if any, and wait for its thread."""
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None

    def _reason(self, reason: str) -> str:
        if not _REASON_CODE.fullmatch(reason):
            return OTHER_REASON
        if reason not in self._reasons:
            if len(self._reasons) >= MAX_REASONS:
                return OTHER_REASON
            self._reasons.add(reason)
        return reason


def parse_address(address: str) -> tuple[str, int]:
    """`host:port` or `[v6]:port`, host an IP literal; ConfigError naming the key otherwise."""
    match = re.fullmatch(r"\[([0-9a-fA-F:.]+)\]:(\d{1,5})|([0-9.]+|localhost):(\d{1,5})", address)
    if match is None:
        raise ConfigError(
            "service.metrics_address",
            f"{address!r} is not host:port (e.g. 127.0.0.1:9464 or [::1]:9464)",
        )
    host = match[1] or match[3]
    port = int(match[2] or match[4])
    if host == "localhost":
        host = "127.0.0.1"
    try:
        ipaddress.ip_address(host)
    except ValueError:
        raise ConfigError("service.metrics_address", f"{host!r} is not an IP address") from None
    if port > 65535:
        raise ConfigError("service.metrics_address", f"port {port} is out of range")
    return host, port

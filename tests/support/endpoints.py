"""The running service's HTTP endpoints (metrics_address = 127.0.0.1:0, port from its log)."""

from __future__ import annotations

import urllib.error
import urllib.request

from prometheus_client.parser import text_string_to_metric_families

from tests.support.service import Service
from tests.support.waiting import wait_until

LOOPBACK_ANY_PORT = "127.0.0.1:0"


def base_url(service: Service) -> str:
    port = wait_until(
        lambda: next(
            (line["port"] for line in service.logs() if line.get("event") == "metrics.serving"),
            None,
        ),
        30,
        message="metrics.serving",
    )
    return f"http://127.0.0.1:{port}"


def get(url: str) -> tuple[int, str]:
    """Status and body; an HTTP error status is an answer, not an exception."""
    try:
        with urllib.request.urlopen(url, timeout=10) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as error:
        return error.code, error.read().decode()


def gauges(service: Service) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every gauge sample of /metrics, keyed by name and sorted labels."""
    _, text = get(f"{base_url(service)}/metrics")
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text)
        if family.type == "gauge"
        for sample in family.samples
    }

"""The health rule shared by `medbatch status` and `/healthz`."""

from __future__ import annotations

from typing import Any

import pytest

from daemon.liveness import NOT_STARTED, assess

NOW = 1_800_000_000.0
HEALTHY = {
    "heartbeat": NOW - 2,
    "pid": 4242,
    "heartbeat_s": 5.0,
    "healthy": True,
    "paused": None,
    "workers_ok": True,
    "watches_ok": True,
}


def verdict(is_alive: bool = True, **changes: Any) -> Any:
    meta = {**HEALTHY, **changes}
    return assess(meta.get, NOW, lambda pid: is_alive and pid == 4242)


def test_healthy() -> None:
    v = verdict()
    assert (v.state, v.running, v.healthy, v.pid, v.heartbeat_age_s, v.problem) == (
        "running",
        True,
        True,
        4242,
        2.0,
        None,
    )


@pytest.mark.parametrize(
    ("changes", "problem"),
    [
        ({"heartbeat": NOW - 21}, "no heartbeat for 21 s (main loop stuck?)"),
        (
            {"paused": "disk_full", "healthy": False},
            "intake paused (disk_full): no files are taken",
        ),
        (
            {"workers_ok": False, "healthy": False},
            "the worker pool is broken (no worker can run a batch)",
        ),
        ({"watches_ok": False, "healthy": False}, "the inbox watches are down"),
        # An older service records only `healthy`.
        (
            {"workers_ok": None, "watches_ok": None, "healthy": False},
            "the service reports itself unhealthy (watcher or scheduler down)",
        ),
        # The most fundamental problem is named first.
        (
            {"heartbeat": NOW - 60, "paused": "disk_full", "workers_ok": False},
            "no heartbeat for 60 s (main loop stuck?)",
        ),
        (
            {"paused": "audit_unwritable", "workers_ok": False, "healthy": False},
            "intake paused (audit_unwritable): no files are taken",
        ),
    ],
)
def test_degraded_names_the_problem(changes: dict[str, Any], problem: str) -> None:
    v = verdict(**changes)
    assert (v.state, v.running, v.healthy, v.problem) == ("degraded", True, False, problem)


@pytest.mark.parametrize(
    ("is_alive", "changes"),
    [(True, {"heartbeat": None}), (True, {"pid": None}), (False, {})],
    ids=["clean-stop", "no-pid", "dead-pid"],
)
def test_not_running(is_alive: bool, changes: dict[str, Any]) -> None:
    v = verdict(is_alive, **changes)
    assert (v.state, v.running, v.healthy, v.pid) == ("not running", False, False, None)


def test_never_started_says_why() -> None:
    assert NOT_STARTED.as_dict()["problem"].startswith("no journal yet")

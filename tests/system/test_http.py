"""The service's HTTP endpoints, live: /healthz follows the health rule of `status`, /metrics
has the state gauges, and no page ever shows a dropped file's name."""

from __future__ import annotations

import json
import os
import random
import re
import signal
import time
from pathlib import Path
from typing import Any

from tests.support.data import emr_csv
from tests.support.endpoints import LOOPBACK_ANY_PORT, base_url, gauges, get
from tests.support.faults import paused_by_full_outbox, pool_workers
from tests.support.service import Service
from tests.support.waiting import wait_until
from tests.system.conftest import MakeService

SERVICE = {"tick_s": 0.1, "rescan_s": 2, "metrics_address": LOOPBACK_ANY_PORT}
# Names that carry identity, in the shapes that reach a page differently: plain, with HTML
# metacharacters (escaped), non-ASCII (escaped or URL-encoded), quotes. Each holds "canary".
CANARY_NAMES = [
    "CANARY-Doe_John-MRN0042.csv",
    "Müller, Jörg <b>canary<i> 7781.csv",
    'o\'brien & "canary".csv',
]
CANARY_JUNK = "canary-Zoë junk.csv"
CANARY_LINK = "canary-link.csv"


def emr(**overrides: object) -> dict[str, object]:
    return {
        "name": "emr",
        "kind": "emr",
        "max_files": 4,
        "max_wait": 600,
        "settle_s": 0.1,
        **overrides,
    }


def status_problem(service: Service) -> Any:
    return json.loads(service.run("status", "--json", timeout_s=30).stdout)["problem"]


def healthz_when(base: str, status: int, timeout_s: float) -> str:
    """The body of /healthz once it answers `status`."""
    answer = wait_until(
        lambda: (found := get(f"{base}/healthz"))[0] == status and found,
        timeout_s,
        message=f"/healthz {status}",
    )
    return answer[1]


def test_healthz_gauges_and_no_name_on_any_page(make_service: MakeService, tmp_path: Path) -> None:
    """A healthy service answers /healthz 200 "ok"; /metrics has the state gauges; after files
    with identifying names are published, quarantined and refused, no page shows any of them."""
    # Given a running service, and files named like patients: published, junk, a symlink
    service = make_service([emr()], service=SERVICE)
    service.start()
    started = time.time()
    rng = random.Random(5)
    for name in CANARY_NAMES:
        service.drop("emr", name, emr_csv(rng))
    service.drop("emr", CANARY_JUNK, b"\x00\x01 not a table")
    (tmp_path / "target.csv").write_bytes(emr_csv(rng))
    os.symlink(tmp_path / "target.csv", service.inbox / "emr" / CANARY_LINK)
    wait_until(lambda: service.accounted() == 4, 60, message="4 files accounted")
    base = base_url(service)
    # (the names really are in the service's records, so the check below can fail)
    assert "canary" in json.dumps(service.audit()).lower()

    # Then /healthz is 200 "ok", the same answer as `status`
    assert get(f"{base}/healthz") == (200, "ok\n")
    assert status_problem(service) is None
    # And the state gauges are there, with plausible values
    found = gauges(service)
    assert found[("medbatch_intake_paused", ())] == 0
    for folder in ("inbox", "state", "outbox", "quarantine"):
        assert found[("medbatch_disk_free_bytes", (("folder", folder),))] > 0
    assert found[("medbatch_oldest_waiting_seconds", (("pipeline", "emr"),))] == 0
    last = found[("medbatch_last_publish_timestamp_seconds", (("pipeline", "emr"),))]
    assert started <= last <= time.time()
    # And no page shows a name, in any encoding (the token is ASCII: escaping keeps it)
    page = get(f"{base}/")[1]
    assert "quarantine-row" in page and "audit-line" in page and "recent-batch" in page
    for path in ("/", "/healthz", "/metrics"):
        status, body = get(base + path)
        assert status == 200 and "canary" not in body.lower(), path
    assert not re.search(r"m(ü|&#252;|%C3%BC)ller|zo(ë|%C3%AB)", page, re.IGNORECASE)
    assert service.stop() == 0


def test_healthz_is_503_while_the_worker_pool_is_broken(make_service: MakeService) -> None:
    """Killing an idle pool worker breaks the pool; the watch rebuilds it at once. While the
    new workers cannot start (stopped here), /healthz says 503 and why (the same as `status`);
    once they run, 200 again and a batch publishes on the new pool."""
    service = make_service([emr(max_files=1)], service=SERVICE)
    service.start()
    base = base_url(service)
    wait_until(lambda: len(pool_workers(service)) == 2, 30, message="2 pool workers")
    healthz_when(base, 200, 30)
    old = set(pool_workers(service))
    stopped: set[int] = set()

    def broken() -> str | None:
        for pid in set(pool_workers(service)) - old - stopped:
            os.kill(pid, signal.SIGSTOP)  # the rebuild's workers: stuck before their warm-up
            stopped.add(pid)
        code, body = get(f"{base}/healthz")
        return body if code == 503 else None

    # When a worker dies with no batch to blame
    os.kill(min(old), signal.SIGKILL)
    try:
        # Then, while the new pool cannot start, /healthz is 503 naming the pool, as status is
        body = wait_until(broken, 30, interval_s=0.01, message="/healthz 503")
        assert body == "degraded: the worker pool is broken (no worker can run a batch)\n"
        assert status_problem(service) == body.removeprefix("degraded: ").strip()
    finally:
        for pid in stopped:
            os.kill(pid, signal.SIGCONT)
    # Once its workers run, the rebuilt pool is healthy and takes work
    healthz_when(base, 200, 30)
    assert any(line["event"] == "pool.rebuilt" for line in service.logs())
    service.drop("emr", "v.csv", emr_csv(random.Random(1)))
    wait_until(lambda: service.accounted() == 1, 60, message="published on the new pool")
    assert service.stop() == 0


def test_healthz_is_503_while_intake_is_paused(make_service: MakeService) -> None:
    """A full outbox pauses intake: /healthz 503 naming the pause, gauge 1; space back: 200."""
    service = make_service([emr(max_files=2, max_wait=1)], service=SERVICE)
    with paused_by_full_outbox(service, seed=2) as ballast:
        base = base_url(service)
        body = healthz_when(base, 503, 60)
        assert re.fullmatch(
            r"degraded: intake paused \((disk_full|audit_unwritable|"
            r"io_error)\): no files are taken\n",
            body,
        ), body
        # `status` names the same pause (read twice, in turn: the reason may move on from
        # disk_full to audit_unwritable between the two reads, as the outbox stays full)
        wait_until(
            lambda: (
                status_problem(service)
                == healthz_when(base, 503, 10).removeprefix("degraded: ").strip()
            ),
            30,
            message="status and /healthz agree",
        )
        assert gauges(service)[("medbatch_intake_paused", ())] == 1
        ballast.unlink()
        wait_until(lambda: service.accounted() == 4, 60, message="all published")
        healthz_when(base, 200, 30)
        assert gauges(service)[("medbatch_intake_paused", ())] == 0
        assert service.stop() == 0

"""Crash loops: a producer keeps dropping EMR tables and images while the service, or its workers,
are killed with SIGKILL at random moments; after a final drain every file is accounted for once.

Replay a failure with `MEDBATCH_SEED=<printed seed>`; `MEDBATCH_SOAK=1` runs far longer.
"""

from __future__ import annotations

import os
import random
import signal
import time
from collections.abc import Iterator
from contextlib import closing
from typing import Any

import pytest

from tests.support.accounting import check_accounting
from tests.support.faults import (
    SOAK,
    OutboxReader,
    Producer,
    Sessions,
    emr_and_images,
    events,
    pool_workers,
    seed_from_env,
    stderr_tail,
)
from tests.support.service import Service
from tests.support.waiting import wait_until
from tests.system.conftest import MakeService

N_EMR = 12_000 if SOAK else 600
N_IMAGES = 150 if SOAK else 12
KILLS = 200 if SOAK else 8
# Files per second: the producer keeps dropping for roughly the whole kill loop.
RATE_PER_S = 40.0 if SOAK else 30.0
TIMEOUT_S = 7200 if SOAK else 300


def pipelines() -> list[dict[str, Any]]:
    return [
        {"name": "emr", "kind": "emr", "max_files": 50, "max_wait": 1.5, "settle_s": 0.5},
        {
            "name": "imaging",
            "kind": "imaging",
            "priority": 2,
            "max_files": 8,
            "max_wait": 2,
            "settle_s": 0.5,
            "thumbnail_px": 16,
        },
    ]


@pytest.fixture
def sessions() -> Iterator[Sessions]:
    """Every session a test started; orphans (workers of a killed service) are killed at the end."""
    found = Sessions()
    yield found
    found.kill_all()


def assert_alive(service: Service, what: str) -> None:
    assert service.process is not None
    code = service.process.poll()
    assert code is None, (
        f"the service died by itself ({what}), exit {code}:\n{stderr_tail(service)}"
    )


def drain(service: Service, sessions: Sessions, producer: Producer) -> dict[str, str]:
    """Let the producer finish; run until every file is accounted for; stop with SIGTERM."""
    dropped = producer.join()
    try:
        wait_until(
            lambda: service.accounted() >= len(dropped) or service.process.poll() is not None,
            120,
            interval_s=0.2,
            message=f"all {len(dropped)} files accounted",
        )
    except AssertionError as exc:
        raise AssertionError(
            f"{exc} ({service.accounted()} were):\n{stderr_tail(service)}"
        ) from None
    assert_alive(service, "final drain")
    assert service.stop(timeout_s=60) == 0, stderr_tail(service)
    # Orphaned workers of a service killed alone must exit by themselves, and not linger.
    wait_until(lambda: not sessions.alive(), 30, message="every worker of every run gone")
    return dropped


@pytest.mark.timeout(TIMEOUT_S)
def test_service_killed_at_random_moments_loses_and_repeats_nothing(
    make_service: MakeService, sessions: Sessions
) -> None:
    """kill -9 of the service (with its workers, or alone leaving them orphaned) at random
    moments, ≥ 20 times under load: after a final drain each input is published exactly once."""
    seed = seed_from_env()
    rng = random.Random(seed)
    service = make_service(pipelines())
    plan = emr_and_images(rng, N_EMR, N_IMAGES)
    producer = Producer(service.inbox, plan, rate_per_s=RATE_PER_S)
    kinds: dict[str, int] = {"kill_all": 0, "kill": 0, "during_start": 0}
    started = time.monotonic()

    with OutboxReader(service.outbox) as reader, closing(producer):
        service.start()
        sessions.started(service)
        producer.start()
        for n in range(KILLS):
            # Given a running service (or one still starting and recovering)
            if rng.random() < 0.2:
                time.sleep(rng.uniform(0.3, 2.5))
                kinds["during_start"] += 1
            else:
                wait_until(
                    lambda: service.is_ready() or service.process.poll() is not None,
                    60,
                    message="daemon.ready",
                )
                time.sleep(rng.uniform(0.0, 2.5))
            assert_alive(service, f"before kill {n + 1}")
            # When it is killed at that moment (its workers too, or left orphaned)
            if rng.random() < 0.3:
                service.kill()
                kinds["kill"] += 1
            else:
                service.kill_all()
                kinds["kill_all"] += 1
            # Then it is simply started again
            service.start(wait_ready=False)
            sessions.started(service)
        wait_until(service.is_ready, 60, message="daemon.ready after the last kill")
        dropped = drain(service, sessions, producer)

    elapsed = time.monotonic() - started
    published = service.manifests()
    print(
        f"seed={seed} kills={kinds} files={len(dropped)} ({producer.counts()}) "
        f"batches={len(published)} recovered_lines={len(events(service, 'daemon.recovered'))} "
        f"reader_saw={reader.folders_seen} elapsed={elapsed:.0f}s"
    )
    assert not reader.problems, reader.problems[:10]
    assert service.quarantined() == [], "a valid file was quarantined by a kill of the service"
    check_accounting(service, dropped)


@pytest.mark.timeout(TIMEOUT_S)
def test_workers_killed_at_random_moments_lose_and_repeat_nothing(
    make_service: MakeService, sessions: Sessions
) -> None:
    """kill -9 of pool workers at random moments, ≥ 20 times under load: the service stays up,
    replaces them and retries their batches; each input is published exactly once."""
    seed = seed_from_env()
    rng = random.Random(seed)
    service = make_service(pipelines())
    plan = emr_and_images(rng, N_EMR, N_IMAGES)
    # The producer spans the kill loop (an idle pool may keep no worker to kill).
    producer = Producer(service.inbox, plan, rate_per_s=RATE_PER_S if SOAK else RATE_PER_S * 1.5)
    killed: list[int] = []
    busy_kills = 0
    started = time.monotonic()

    with OutboxReader(service.outbox) as reader, closing(producer):
        service.start()
        sessions.started(service)
        producer.start()
        had_workers_at = time.monotonic()
        while len(killed) < KILLS:
            time.sleep(rng.uniform(0.2, 1.5))
            # Prefer a moment when a batch runs, so that most kills cost an attempt.
            running = wait_until_running(service, timeout_s=3)
            workers = [p for p in pool_workers(service) if p not in killed]
            assert_alive(service, f"before worker kill {len(killed) + 1}")
            if not workers:
                # An idle service may keep no worker; one with work waiting must not.
                if not has_work(service):
                    if producer.is_done:
                        break  # nothing left to do, nobody left to kill
                    had_workers_at = time.monotonic()
                assert time.monotonic() - had_workers_at < 60, (
                    f"work waiting and no pool worker for 60 s after {len(killed)} kills "
                    f"(the service hangs):\n{stderr_tail(service)}"
                )
                continue
            had_workers_at = time.monotonic()
            victim = rng.choice(workers)
            try:
                os.kill(victim, signal.SIGKILL)
            except ProcessLookupError:
                continue
            killed.append(victim)
            busy_kills += running
        assert len(killed) >= min(KILLS, 20), f"only {len(killed)} workers killed"
        dropped = drain(service, sessions, producer)

    elapsed = time.monotonic() - started
    crashes = [q for q in service.quarantined() if q["reason"] == "worker_crash"]
    print(
        f"seed={seed} worker_kills={len(killed)} while_running={busy_kills} "
        f"files={len(dropped)} retried={len(events(service, 'batch.retried'))} "
        f"split={len(events(service, 'batch.split'))} quarantined_worker_crash={len(crashes)} "
        f"elapsed={elapsed:.0f}s"
    )
    assert not reader.problems, reader.problems[:10]
    assert len(events(service, "daemon.started")) == 1, "the service restarted"
    others = [q for q in service.quarantined() if q["reason"] != "worker_crash"]
    assert not others, f"quarantined for another reason than a killed worker: {others[:3]}"
    check_accounting(service, dropped)


def has_work(service: Service) -> bool:
    """Files waiting in an inbox, or not yet finished in the journal."""
    if any(p.is_file() for p in service.inbox.glob("*/*")):
        return True
    return bool(
        service.journal(
            "SELECT 1 FROM files WHERE state NOT IN ('published', 'quarantined', 'duplicate') "
            "LIMIT 1"
        )
    )


def wait_until_running(service: Service, timeout_s: float) -> bool:
    """True once a batch is running (journal), False after `timeout_s`."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if service.journal("SELECT 1 FROM batches WHERE state='running' LIMIT 1"):
            return True
        time.sleep(0.02)
    return False

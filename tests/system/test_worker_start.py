"""Workers that cannot start (a plug-in that no longer imports, a sandbox that denies their
start-up a call): the service keeps running, tries each next pool later (1, 2, 4 … s), sends no
batch meanwhile, so none fails or is quarantined, and publishes once workers start again."""

from __future__ import annotations

import json
from pathlib import Path

from tests.support.service import Service
from tests.support.waiting import wait_until
from tests.system.conftest import MakeService
from tests.system.test_faults import faulty, note


def events(service: Service, name: str) -> list[dict[str, object]]:
    return [line for line in service.logs() if line.get("event") == name]


def test_a_pool_that_cannot_start_is_retried_ever_later_and_loses_nothing(
    make_service: MakeService, tmp_path: Path
) -> None:
    # Given a service whose workers cannot start (their processor fails to import)
    broken = tmp_path / "broken-start"
    broken.touch()
    (tmp_path / "svc").mkdir()
    service = make_service([faulty(max_files=3, max_wait=1)], root=tmp_path / "svc")
    service.start(env={"MEDBATCH_TEST_BROKEN_START": str(broken)})
    dropped = {f"n{i}.txt": service.drop("notes", f"n{i}.txt", note(i)) for i in range(3)}
    # When it has tried for a while
    wait_until(lambda: len(events(service, "pool.workers_cannot_start")) >= 4, 60,
               message="four pools that could not start")  # fmt: skip
    # Then each next pool waited longer than the one before (1, 2, 4 … s)
    waits = [line["retry_in_s"] for line in events(service, "pool.workers_cannot_start")]
    assert waits[:4] == [1.0, 2.0, 4.0, 8.0], waits
    # And the workers said why, by the error's type only
    assert {line["error"] for line in events(service, "worker.start_failed")} == {
        "UnknownProcessorError"
    }
    # And the batch was sent at most once (into the first pool, before it was known broken),
    # that attempt not counted against it, and nothing was quarantined
    audited = [line["event"] for line in service.audit()]
    assert "batch.sealed" in audited and audited.count("batch.started") <= 1
    failed = events(service, "batch.attempt_failed")
    assert len(failed) <= 1 and {f["reason"] for f in failed} <= {"executor_unavailable"}
    assert all(r["counted"] is False for r in events(service, "batch.retried"))
    assert service.quarantined() == []
    assert service.process is not None and service.process.poll() is None
    assert not events(service, "pool.ready"), "a pool whose workers cannot start is never ready"
    # And `medbatch status` says it is degraded, and why
    report = wait_until(
        lambda: (
            (r := json.loads(service.run("status", "--json", timeout_s=30).stdout))["state"]
            == "degraded"
            and r
        ),
        30,
        message="status to say degraded",
    )
    assert "worker pool" in str(report["problem"]), report
    # When the workers can start again
    broken.unlink()
    # Then the next pool starts and the batch is published, every file once
    wait_until(lambda: len(service.published_inputs("notes")) == len(dropped), 60,
               message="the batch published after the pool started")  # fmt: skip
    published = [i["name"] for i in service.published_inputs("notes")]
    assert sorted(published) == sorted(dropped)
    assert events(service, "pool.rebuilt")
    assert service.stop() == 0


def test_workers_keep_the_operators_numpy_huge_page_choice(make_service: MakeService) -> None:
    """NUMPY_MADVISE_HUGEPAGE set in the service's environment reaches its workers (forked by
    the fork server, which the service starts with its environment) unchanged."""
    service = make_service([faulty(max_files=1)])
    service.start(env={"NUMPY_MADVISE_HUGEPAGE": "1"})
    workers = wait_until(lambda: len(w := service.worker_pids()) == 2 and w, 60,
                         message="two workers")  # fmt: skip
    for pid in workers:
        environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
        assert b"NUMPY_MADVISE_HUGEPAGE=1" in environ
    assert service.stop() == 0


def test_a_pool_whose_workers_started_says_so_once(make_service: MakeService) -> None:
    """`pool.ready`: the workers have imported their libraries and started (they do so while the
    service starts and after `daemon.ready`), so an operator, or the idle bench, can count the
    service as started whole."""
    service = make_service([faulty(max_files=1)])
    service.start()
    wait_until(lambda: events(service, "pool.ready"), 60, message="pool.ready")
    (ready,) = events(service, "pool.ready")
    assert ready["workers"] == 2  # the test services' [workers] count
    assert service.stop() == 0

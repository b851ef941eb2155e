"""The batch flow and recovery in one process: a fake executor, an injected clock, the real
journal, audit log, intake and disposal. Seal → dispatch → commit / retry / split / give up."""

from __future__ import annotations

import json
from collections.abc import Iterator
from concurrent.futures import Future
from pathlib import Path
from typing import Any

import pytest

from daemon.audit import AuditLog, read_lines
from daemon.batch_flow import BatchFlow
from daemon.batcher import Batcher
from daemon.config import Settings
from daemon.dispatcher import PriorityDispatcher
from daemon.disposal import Disposal
from daemon.errors import BatchFailedError
from daemon.intake.intake import Intake
from daemon.journal import Journal
from daemon.metrics import Metrics
from daemon.models import BatchResult, BatchTask, Reason
from daemon.notify import Notifier
from daemon.outcome_listeners import IntakeGate, Progress, standard_listeners
from daemon.recovery import Recovery


class Clock:
    def __init__(self) -> None:
        self.now = 1_000.0

    def __call__(self) -> float:
        return self.now


class FakeExecutor:
    """Takes tasks; the test decides each outcome."""

    def __init__(self) -> None:
        self.submitted: list[BatchTask] = []
        self.futures: list[Future[BatchResult]] = []
        self.recovered = 0
        self.is_lost = False

    def start(self) -> None: ...
    def submit(self, task: BatchTask) -> Future[BatchResult]:
        self.submitted.append(task)
        self.futures.append(Future())
        return self.futures[-1]

    def future_of(self, task: BatchTask) -> Future[BatchResult]:
        return next(f for t, f in zip(self.submitted, self.futures, strict=True) if t is task)

    def is_worker_loss(self, exc: BaseException) -> bool:
        return isinstance(exc, ChildProcessError)

    def recover(self) -> None:
        self.recovered += 1

    def is_healthy(self) -> bool:
        return True

    def has_lost_work(self) -> bool:
        return self.is_lost

    def worker_pids(self) -> list[int]:
        return []

    def reconfigure(self, workers: int, kinds: Any) -> None: ...
    def shutdown(self, *, wait: bool) -> None: ...


class World:
    def __init__(self, root: Path, max_files: int = 4) -> None:
        self.root = root
        self.settings = Settings.model_validate(
            {
                "paths": {
                    "inbox": root / "inbox",
                    "outbox": root / "outbox",
                    "state": root / "state",
                    "quarantine": root / "quarantine",
                },
                "workers": {"count": 2, "max_attempts": 3},
                "pipeline": [{"name": "emr", "kind": "emr", "settle_s": 0,
                              "max_files": max_files, "max_wait": 60}],
            }
        )  # fmt: skip
        (root / "inbox" / "emr").mkdir(parents=True)
        (root / "state" / "spool").mkdir(parents=True)
        self.clock = Clock()
        self.open()

    def open(self) -> None:
        paths = self.settings.paths
        self.journal = Journal(paths.journal)
        self.audit = AuditLog(paths.audit)
        self.intake = Intake(self.settings, self.journal, self.audit)
        self.batcher = Batcher({p.name: p for p in self.settings.pipeline})
        self.dispatcher = PriorityDispatcher(2, 1 << 30, 60)
        self.gate = IntakeGate(self.audit, self.journal)
        self.progress = Progress()
        pipelines = {p.name: p for p in self.settings.pipeline}
        self.disposal = Disposal(paths, self.journal, lambda: pipelines)
        listeners = standard_listeners(
            self.audit, Metrics(), self.gate, self.progress, Notifier(None), self.disposal
        )
        self.flow = BatchFlow(
            self.settings, self.journal, self.dispatcher, listeners, wall=self.clock,
            mono=self.clock,
        )  # fmt: skip
        self.executor = FakeExecutor()
        self.flow.executor = self.executor

    def close(self) -> None:
        self.audit.close()
        self.journal.close()

    def take(self, n: int) -> None:
        """Drop n files, claim them, admit them, dispatch what that seals."""
        for i in range(n):
            (self.root / "inbox" / "emr" / f"f{i}.csv").write_text(f"a,b\n{i},1\n")
            self.intake.offer("emr", self.root / "inbox" / "emr" / f"f{i}.csv")
        for incoming in self.intake.take_settled():
            for sealed in self.batcher.add(incoming, self.clock()):
                self.flow.seal(sealed)
        self.flow.dispatch()

    def finish(self, task: BatchTask, outcome: BatchResult | BaseException) -> None:
        future = self.executor.future_of(task)
        if isinstance(outcome, BaseException):
            future.set_exception(outcome)
        else:
            future.set_result(outcome)
        self.flow.on_done(task.batch.batch_id, future)

    def later(self, seconds: float) -> None:
        """Let the clock run, release what is due, dispatch."""
        self.clock.now += seconds
        self.flow.release_delayed()
        self.flow.dispatch()

    def events(self) -> list[dict[str, Any]]:
        self.audit.sync()
        return list(read_lines(self.settings.paths.audit))

    def file_states(self) -> list[tuple[str, str | None]]:
        rows = self.journal._db.execute("SELECT state, reason FROM files ORDER BY id")
        return [(str(s), r) for s, r in rows.fetchall()]


def published(task: BatchTask) -> BatchResult:
    facts: dict[int, dict[str, int | float | str]] = {
        f.file_id: {"rows": 1} for f in task.batch.files
    }
    return BatchResult(task.batch.batch_id, task.outbox_dir / task.batch.batch_id, 1.0, facts=facts)


@pytest.fixture
def world(tmp_path: Path) -> Iterator[World]:
    w = World(tmp_path)
    yield w
    w.close()


def test_a_published_batch_is_committed_audited_and_archived(world: World) -> None:
    """Seal at max_files, one attempt, published: journal, audit lines and archive agree."""
    world.take(4)
    (task,) = world.executor.submitted
    assert task.batch.attempt == 1 and len(task.batch.files) == 4

    world.finish(task, published(task))

    assert world.file_states() == [("published", None)] * 4
    events = [line["event"] for line in world.events()]
    assert events.count("file.received") == 4
    assert events[-3:] == ["batch.sealed", "batch.started", "batch.published"]
    assert not [p for p in (world.root / "state" / "spool").rglob("*") if p.is_file()]
    assert len(list((world.root / "state" / "archive" / "emr").rglob("*.csv"))) == 4
    assert world.flow.is_idle and world.progress.published == 1


def test_a_batch_that_kills_its_worker_twice_is_split(world: World) -> None:
    """worker_crash → retried after its delay → worker_crash again → two halves, each run."""
    world.take(4)
    (first,) = world.executor.submitted
    world.finish(first, ChildProcessError())
    world.later(0.5)
    assert len(world.executor.submitted) == 1  # the retry waits its back-off
    world.later(1.0)
    second = world.executor.submitted[1]
    assert second.batch.attempt == 2 and world.executor.recovered == 1

    world.finish(second, ChildProcessError())
    world.later(0)

    halves = world.executor.submitted[2:]
    assert sorted(len(t.batch.files) for t in halves) == [2, 2]
    split = [line for line in world.events() if line["event"] == "batch.split"]
    assert set(split[0]["into"]) == {t.batch.batch_id for t in halves}
    for half in halves:
        world.finish(half, published(half))
    assert world.file_states() == [("published", None)] * 4


def test_a_batch_that_times_out_twice_is_quarantined_whole(world: World) -> None:
    """timeout twice: given up, every input quarantined with the reason, sidecars written."""
    world.take(4)
    world.finish(world.executor.submitted[0], TimeoutError())
    world.later(1.0)
    world.finish(world.executor.submitted[1], TimeoutError())

    assert world.file_states() == [("quarantined", "timeout")] * 4
    failed = [line for line in world.events() if line["event"] == "batch.failed"]
    assert failed[0]["reason"] == "timeout" and failed[0]["attempts"] == 2
    sidecars = list((world.root / "quarantine" / "emr").glob("*.error.json"))
    assert len(sidecars) == 4
    assert {json.loads(p.read_text())["reason"] for p in sidecars} == {"timeout"}


def test_a_full_disk_pauses_intake_and_costs_no_attempt(world: World) -> None:
    """disk_full: intake paused, the retry does not count; a publish resumes intake."""
    world.take(4)
    world.finish(world.executor.submitted[0], BatchFailedError(Reason.DISK_FULL))
    assert world.gate.paused == Reason.DISK_FULL
    world.later(1.0)
    retry = world.executor.submitted[1]
    assert retry.batch.attempt == 1

    world.finish(retry, published(retry))

    assert world.gate.paused is None
    events = [line["event"] for line in world.events()]
    assert events.index("intake.paused") < events.index("intake.resumed")


@pytest.mark.parametrize("late", ["published", "failed"])
def test_a_reclaimed_attempts_late_report_does_not_stand_for_its_retry(
    world: World, late: str
) -> None:
    """A pool loses an attempt (reclaimed, retried uncounted); the lost attempt reports after
    all: the retry's outcome alone decides, and the batch is published once."""
    world.take(4)
    (lost,) = world.executor.submitted
    world.executor.is_lost = True
    world.flow.reclaim_lost()
    world.executor.is_lost = False
    world.later(1.0)
    retry = world.executor.submitted[-1]
    assert retry is not lost and retry.batch.batch_id == lost.batch.batch_id
    assert retry.batch.attempt == lost.batch.attempt, "a lost attempt does not count"

    world.finish(lost, published(lost) if late == "published" else ChildProcessError())
    assert retry.batch.batch_id in world.flow.inflight, "the retry is still in flight"
    assert "batch.published" not in [line["event"] for line in world.events()]
    world.finish(retry, published(retry))

    assert world.file_states() == [("published", None)] * 4
    events = [line["event"] for line in world.events()]
    assert events.count("batch.published") == 1
    assert world.flow.is_idle


def test_recovery_reruns_an_interrupted_batch_uncounted(world: World) -> None:
    """A stop mid-batch: the next start re-runs it as attempt 1 again, and says so."""
    world.take(4)
    (task,) = world.executor.submitted
    world.close()  # the service stops while the batch runs

    world.open()
    found = Recovery(
        world.settings, world.journal, world.audit, world.intake, world.batcher, world.flow,
        world.disposal, wall=world.clock,
    ).run()  # fmt: skip
    world.flow.dispatch()

    assert found.batches_rerun == 1
    (rerun,) = world.executor.submitted
    assert rerun.batch.batch_id == task.batch.batch_id and rerun.batch.attempt == 1
    world.finish(rerun, published(rerun))
    assert world.file_states() == [("published", None)] * 4
    assert world.events()[-1]["event"] == "batch.published"

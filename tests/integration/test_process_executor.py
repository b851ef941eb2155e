"""The real worker pool: a dead or hung worker costs exactly the batch it was running."""

from __future__ import annotations

import os
import queue
import signal
import time
from concurrent.futures import Future
from pathlib import Path

import pytest

from daemon.errors import BatchFailedError, ExecutorUnavailableError
from daemon.executors.process import ProcessExecutor, shares
from daemon.models import Batch, BatchResult, BatchTask, IncomingFile
from tests.support.waiting import wait_until


def make_task(tmp_path: Path, batch_id: str, content: bytes) -> BatchTask:
    spool = tmp_path / "spool" / f"{batch_id}.txt"
    spool.parent.mkdir(parents=True, exist_ok=True)
    spool.write_bytes(content)
    incoming = IncomingFile(1, "p", f"{batch_id}.txt", spool, "0" * 64, len(content), 0.0)
    batch = Batch(batch_id, "p", "faulty", 3, time.time(), (incoming,))
    return BatchTask(batch, {"skip_blank": True}, tmp_path / "outbox" / "p")


@pytest.fixture
def pool() -> tuple[ProcessExecutor, queue.SimpleQueue[tuple[str, Future[BatchResult]]]]:
    done: queue.SimpleQueue[tuple[str, Future[BatchResult]]] = queue.SimpleQueue()
    executor = ProcessExecutor(2, ["faulty"], lambda b, f: done.put((b, f)), timeout_s=2.0)
    executor.start()
    yield executor, done
    executor.shutdown(wait=False)


def outcomes(
    done: queue.SimpleQueue[tuple[str, Future[BatchResult]]], n: int
) -> dict[str, Future[BatchResult]]:
    return dict(done.get(timeout=30) for _ in range(n))


def test_a_killed_worker_fails_only_its_own_batch(tmp_path: Path, pool) -> None:
    """SIGKILL inside one batch: that batch reports a worker loss, the other publishes."""
    executor, done = pool
    executor.submit(make_task(tmp_path, "crash", b"MEDBATCH-TEST-CRASH\n"))
    executor.submit(make_task(tmp_path, "fine", b"a\nb\n"))

    results = outcomes(done, 2)

    assert results["fine"].result().is_published
    error = results["crash"].exception()
    assert error is not None and executor.is_worker_loss(error)
    executor.submit(make_task(tmp_path, "after", b"c\n"))  # the pool replaced the worker
    assert outcomes(done, 1)["after"].result().is_published


def test_a_segfault_is_a_worker_loss_too(tmp_path: Path, pool) -> None:
    """A segfaulting processor is reported as a lost worker, not a hang."""
    executor, done = pool
    executor.submit(make_task(tmp_path, "segv", b"MEDBATCH-TEST-SEGV\n"))
    error = outcomes(done, 1)["segv"].exception()
    assert error is not None and executor.is_worker_loss(error)


def test_a_hung_batch_is_killed_at_its_timeout(tmp_path: Path, pool) -> None:
    """A batch past the timeout fails with TimeoutError and its worker is replaced."""
    executor, done = pool
    started = time.monotonic()
    executor.submit(make_task(tmp_path, "hang", b"MEDBATCH-TEST-HANG\n"))
    error = outcomes(done, 1)["hang"].exception()
    assert isinstance(error, TimeoutError)
    assert 1.5 < time.monotonic() - started < 15
    executor.submit(make_task(tmp_path, "after", b"c\n"))
    assert outcomes(done, 1)["after"].result().is_published


def test_a_full_disk_comes_back_as_disk_full(tmp_path: Path, pool) -> None:
    """An outbox that cannot be written fails the attempt as disk_full/io_error, picklably."""
    executor, done = pool
    task = make_task(tmp_path, "nowhere", b"a\n")
    blocker = tmp_path / "outbox"
    blocker.parent.mkdir(exist_ok=True)
    blocker.write_text("a file where the outbox folder should be")
    executor.submit(task)
    error = outcomes(done, 1)["nowhere"].exception()
    assert isinstance(error, BatchFailedError) and error.reason in ("disk_full", "io_error")


def test_an_idle_worker_killed_does_not_stop_the_pool(tmp_path: Path, pool) -> None:
    """pebble breaks the whole pool when a worker dies with no task to blame; the executor
    replaces the pool on a thread of its own (submit never waits for it): attempts meanwhile
    fail as unavailable, then work goes on."""
    executor, done = pool
    for pid in executor.worker_pids():
        os.kill(pid, signal.SIGKILL)
    results: dict[str, Future[BatchResult]] = {}
    deadline = time.monotonic() + 60
    while not any(f.exception() is None for f in results.values()):
        assert time.monotonic() < deadline, "the pool was never rebuilt"
        submitted_at = time.monotonic()
        executor.submit(make_task(tmp_path, f"after{len(results)}", b"x\n"))
        batch_id, future = done.get(timeout=30)
        results[batch_id] = future
        if future.exception() is not None:
            # Unavailable at once while the pool is rebuilt: the main loop is never held up.
            assert isinstance(future.exception(), ExecutorUnavailableError)
            assert time.monotonic() - submitted_at < 0.5
            wait_until(executor.is_healthy, 60, message="the pool rebuilt")
    executor.submit(make_task(tmp_path, "last", b"y\n"))
    assert outcomes(done, 1)["last"].result().is_published


@pytest.mark.parametrize("held", ["taking a task", "sending a result"])
def test_a_pool_wedged_by_a_lock_a_killed_worker_held_is_rebuilt(tmp_path: Path, held: str) -> None:
    """A worker killed inside pebble's task transaction (or while sending its result) leaves
    the pool's channel lock taken for good, and pebble never calls the pool broken (pebble#163).
    The lock is taken here as such a worker leaves it: the waiting attempt is reported
    unavailable within the stall bound, once, and the rebuilt pool runs its retry."""
    done: queue.SimpleQueue[tuple[str, Future[BatchResult]]] = queue.SimpleQueue()
    executor = ProcessExecutor(
        2, ["faulty"], lambda b, f: done.put((b, f)), timeout_s=30.0, stall_s=2.0
    )
    executor.start()
    try:
        executor.submit(make_task(tmp_path, "warm", b"a\n"))
        assert outcomes(done, 1)["warm"].result().is_published
        assert executor._pool is not None
        channel = executor._pool._pool_manager.worker_manager.workers_channel
        mutex = (
            channel.mutex.reader_mutex if held == "taking a task" else channel.mutex.writer_mutex
        )
        assert mutex.acquire(timeout=5)
        started = time.monotonic()
        submitted = executor.submit(make_task(tmp_path, "stuck", b"b\n"))
        batch_id, future = done.get(timeout=30)
        assert batch_id == "stuck" and future is submitted
        assert isinstance(future.exception(), ExecutorUnavailableError)
        assert time.monotonic() - started < 15
        wait_until(
            lambda: executor.is_healthy() and not executor.has_lost_work(), 60,
            message="the pool rebuilt",
        )  # fmt: skip
        executor.submit(make_task(tmp_path, "stuck", b"b\n"))
        assert outcomes(done, 1)["stuck"].result().is_published
        executor.shutdown(wait=False)  # joins every pool: a late report would be in by now
        assert done.empty(), "the stalled attempt was reported twice"
    finally:
        executor.shutdown(wait=False)


def make_split_task(tmp_path: Path, batch_id: str, contents: list[bytes]) -> BatchTask:
    files = []
    for i, content in enumerate(contents, start=1):
        spool = tmp_path / "spool" / f"{batch_id}-{i}.txt"
        spool.parent.mkdir(parents=True, exist_ok=True)
        spool.write_bytes(content)
        files.append(IncomingFile(i, "p", spool.name, spool, "0" * 64, len(content), 0.0))
    batch = Batch(batch_id, "p", "faulty", 3, time.time(), tuple(files))
    return BatchTask(batch, {"skip_blank": True}, tmp_path / "outbox" / "p")


def test_no_rebuild_starts_once_the_stop_has_begun(tmp_path: Path, pool) -> None:
    """A stop that kills a running batch's worker makes its report call `recover`: that must
    not start a rebuild, which would stop the same pool from a second thread beside `shutdown`
    (pebble's stop is not safe twice at once: a KeyError crashed the service's stop)."""
    executor, _ = pool
    executor.submit(make_task(tmp_path, "hang", b"MEDBATCH-TEST-HANG\n"))
    wait_until(lambda: executor.worker_pids(), 30, message="workers up")
    executor.shutdown(wait=False)

    executor.recover()  # as a late report of the killed batch does

    assert not executor._is_rebuilding() and executor._pool is None
    assert not executor.is_healthy()


@pytest.mark.parametrize(
    ("sizes", "parts", "expected"),
    [
        ([10] * 8, 2, [(1, 2, 3, 4), (5, 6, 7, 8)]),
        ([10] * 3, 2, [(1, 2), (3,)]),
        ([100, 1, 1, 1], 2, [(1,), (2, 3, 4)]),
        ([10] * 4, 8, [(1,), (2,), (3,), (4,)]),
        ([10, 10], 1, [(1, 2)]),
        ([0, 0], 2, [(1, 2)]),
    ],
)
def test_shares_are_contiguous_and_about_equal_in_bytes(
    tmp_path: Path, sizes: list[int], parts: int, expected: list[tuple[int, ...]]
) -> None:
    files = [
        IncomingFile(i, "p", f"{i}", tmp_path / f"{i}", "0" * 64, size, 0.0)
        for i, size in enumerate(sizes, start=1)
    ]
    assert shares(files, parts) == expected


def test_a_big_batch_is_read_on_every_idle_worker_and_merged_exactly(
    tmp_path: Path, pool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Split into shares (one per idle worker), the batch publishes what one read gives."""
    executor, done = pool
    contents = [b"".join(b"row %d\n" % j for j in range(n)) for n in (3, 5, 7, 11, 13)]
    executor.submit(make_split_task(tmp_path / "whole", "whole", contents))
    whole = outcomes(done, 1)["whole"].result()
    monkeypatch.setattr("daemon.executors.process.SPLIT_MIN_BYTES", 1)

    executor.submit(make_split_task(tmp_path / "split", "split", contents))
    split = outcomes(done, 1)["split"].result()

    assert split.is_published and whole.is_published
    assert split.facts == whole.facts
    assert [o.sha256 for o in split.outputs] == [o.sha256 for o in whole.outputs]


def test_a_worker_killed_in_one_share_is_a_worker_loss_of_the_batch(
    tmp_path: Path, pool, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("daemon.executors.process.SPLIT_MIN_BYTES", 1)
    executor, done = pool
    executor.submit(make_split_task(tmp_path, "crash", [b"a\n", b"MEDBATCH-TEST-CRASH\n"]))
    error = outcomes(done, 1)["crash"].exception()
    assert error is not None and executor.is_worker_loss(error)
    executor.submit(make_split_task(tmp_path, "after", [b"c\n", b"d\n"]))
    assert outcomes(done, 1)["after"].result().is_published


def genomics_task(tmp_path: Path, batch_id: str) -> BatchTask:
    """Four wide tables; the third repeats (G1, S1) of the first: under the default rule
    ("error") it is refused, whichever worker reads which file."""
    samples = [["S1", "S2"], ["S3"], ["S1", "S4"], ["S5"]]
    files = []
    for i, names in enumerate(samples, start=1):
        rows = [f"G{g},{','.join(f'{g * 0.5 + j:.1f}' for j in range(len(names)))}"
                for g in range(1, 200)]  # fmt: skip
        spool = tmp_path / "spool" / f"{batch_id}-{i}.csv"
        spool.parent.mkdir(parents=True, exist_ok=True)
        spool.write_text("\n".join(["gene," + ",".join(names), *rows]) + "\n")
        files.append(IncomingFile(i, "g", spool.name, spool, "0" * 64, spool.stat().st_size, 0.0))
    batch = Batch(batch_id, "g", "genomics", 3, time.time(), tuple(files))
    return BatchTask(batch, {"gene_column": "gene"}, tmp_path / "outbox" / "g")


def test_a_batch_whose_files_depend_on_each_other_is_never_split(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Genomics resolves a (gene, sample) pair repeated across the batch's files: read in
    shares, a file would never see the pairs of another share. Such a batch runs whole, and
    refuses the repeating file as one read does."""
    monkeypatch.setattr("daemon.executors.process.SPLIT_MIN_BYTES", 1)
    done: queue.SimpleQueue[tuple[str, Future[BatchResult]]] = queue.SimpleQueue()
    executor = ProcessExecutor(2, ["genomics"], lambda b, f: done.put((b, f)), timeout_s=30.0)
    executor.start()
    try:
        executor.submit(genomics_task(tmp_path, "g1"))
        result = outcomes(done, 1)["g1"].result()
    finally:
        executor.shutdown(wait=False)
    assert result.is_published
    assert {i: reason for i, (reason, _) in result.quarantined.items()} == {3: "duplicate_pairs"}
    assert sorted(result.facts) == [1, 2, 4]


def test_workers_start_without_numpy_asking_for_huge_pages(pool) -> None:
    """Each worker's environment says NUMPY_MADVISE_HUGEPAGE=0 (inline compaction on a
    fragmented host doubled their CPU); an operator's own value: tests/system/test_worker_start."""
    executor, _ = pool
    wait_until(lambda: len(executor.worker_pids()) == 2, 30, message="workers up")
    for pid in executor.worker_pids():
        environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
        assert b"NUMPY_MADVISE_HUGEPAGE=0" in environ


def test_a_pool_broken_by_an_idle_workers_death_is_rebuilt_without_a_batch(pool) -> None:
    """pebble gives up on its pool when a worker dies with no task running (a late OOM kill,
    an operator's kill): the watch rebuilds it at once, so the next batch does not pay a
    failed attempt, and /healthz is not left at 503 until work arrives."""
    executor, _ = pool
    wait_until(lambda: len(executor.worker_pids()) == 2, 30, message="workers up")
    victim = executor.worker_pids()[0]
    os.kill(victim, signal.SIGKILL)
    wait_until(
        lambda: (
            executor.is_healthy()
            and len(executor.worker_pids()) == 2
            and victim not in executor.worker_pids()
        ),
        30,
        message="a healthy pool of 2 without the killed worker",
    )

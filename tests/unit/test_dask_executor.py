"""The Dask executor's parts that need no cluster: the shared-storage probe, which failures
count as a lost worker, and start-up errors that name what is wrong."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from pathlib import Path

import pytest

from daemon.config import PathsConfig, WorkersConfig
from daemon.errors import BatchFailedError, MedbatchError
from daemon.executors.dask import (
    PROBE_PREFIX,
    ClusterLostError,
    DaskExecutor,
    probe_cluster,
    probe_worker,
)

distributed = pytest.importorskip("distributed")

Run = Callable[..., Mapping[str, object]]


@pytest.fixture
def paths(tmp_path: Path) -> PathsConfig:
    made = PathsConfig(
        inbox=tmp_path / "inbox",
        outbox=tmp_path / "outbox",
        state=tmp_path / "state",
        quarantine=tmp_path / "quarantine",
    )
    for folder in (made.inbox, made.outbox, made.spool, made.quarantine):
        folder.mkdir(parents=True)
    return made


def one_worker(outbox: Path | None = None) -> Run:
    """`Client.run`'s shape: one "worker" that runs the probe here, seeing `outbox` if given."""

    def run(fn: Callable[..., object], marker: str, ours: str, *args: object) -> dict[str, object]:
        return {"tcp://10.0.0.7:4000": fn(marker, str(outbox or ours), *args)}

    return run


def test_probe_passes_on_shared_storage_and_leaves_nothing_behind(paths: PathsConfig) -> None:
    """A worker that reads our spool and writes our outbox passes; no probe file is left."""
    assert probe_cluster(one_worker(), paths, ["emr"]) == 1
    assert list(paths.spool.iterdir()) == []
    assert list(paths.outbox.iterdir()) == []


def test_probe_names_the_spool_a_worker_cannot_see(tmp_path: Path, paths: PathsConfig) -> None:
    """The worker's answer names the spool path it could not find."""
    marker = tmp_path / "not-mounted" / f"{PROBE_PREFIX}abc"
    reply = probe_worker(str(marker), str(paths.outbox), "abc", ("emr",))
    assert reply == {
        "problem": f"cannot see the spool {marker.parent}: it must be the same shared storage"
    }


def test_probe_refuses_a_spool_of_the_same_name_elsewhere(paths: PathsConfig) -> None:
    """A spool that exists on the worker but is another disk holds another token."""
    marker = paths.spool / f"{PROBE_PREFIX}abc"
    marker.write_text("another disk's file")
    reply = probe_worker(str(marker), str(paths.outbox), "abc", ("emr",))
    assert reply["problem"].startswith(f"sees another {paths.spool}")


def test_probe_refuses_a_worker_writing_to_its_own_outbox(
    tmp_path: Path, paths: PathsConfig
) -> None:
    """A worker whose outbox is a local folder of the same name fails the start, by name."""
    local = tmp_path / "worker-local-outbox"
    local.mkdir()
    with pytest.raises(MedbatchError, match=r"tcp://10\.0\.0\.7:4000 writes to another .*outbox"):
        probe_cluster(one_worker(local), paths, ["emr"])
    assert list(paths.spool.iterdir()) == []


def test_probe_names_an_outbox_the_worker_cannot_write(tmp_path: Path, paths: PathsConfig) -> None:
    missing = tmp_path / "no-such-outbox"
    with pytest.raises(MedbatchError, match=f"cannot write to the outbox {missing}"):
        probe_cluster(one_worker(missing), paths, ["emr"])


def test_probe_names_a_kind_the_worker_does_not_have(paths: PathsConfig) -> None:
    with pytest.raises(MedbatchError, match="has no processor for no-such-kind"):
        probe_cluster(one_worker(), paths, ["emr", "no-such-kind"])


def test_probe_says_to_install_medbatch_on_a_worker_that_cannot_run_it(
    paths: PathsConfig,
) -> None:
    """Client.run(on_error="return") hands back the worker's exception as its answer."""

    def run(*args: object) -> dict[str, object]:
        return {"tcp://10.0.0.8:4000": ModuleNotFoundError("No module named 'daemon'")}

    with pytest.raises(MedbatchError, match="install medbatch on every worker"):
        probe_cluster(run, paths, ["emr"])
    assert list(paths.spool.iterdir()) == []


@pytest.mark.parametrize(
    ("error", "is_loss"),
    [
        (distributed.KilledWorker("medbatch-x-1-1", None, 0), True),
        (distributed.comm.CommClosedError("in <TCP (closed)>"), True),
        (distributed.client.FutureCancelledError("medbatch-x-1-1", "scheduler-restart"), True),
        (ClusterLostError("the scheduler forgot it"), True),
        (BatchFailedError("io_error", "OSError errno=5"), False),
        (ValueError("raised by a plug-in"), False),
    ],
    ids=["killed_worker", "comm_closed", "cancelled", "cluster_lost", "batch_failed", "other"],
)
def test_worker_loss_is_what_the_cluster_lost_never_what_the_batch_raised(
    error: BaseException, is_loss: bool
) -> None:
    workers = WorkersConfig(executor="dask", scheduler_address="tcp://127.0.0.1:1")
    executor = DaskExecutor(workers, ["emr"], lambda batch_id, future: None)
    assert executor.is_worker_loss(error) is is_loss


def test_start_names_an_unreadable_scheduler_file(tmp_path: Path) -> None:
    missing = tmp_path / "scheduler.json"
    workers = WorkersConfig(executor="dask", scheduler_file=missing)
    executor = DaskExecutor(workers, ["emr"], lambda batch_id, future: None)
    with pytest.raises(MedbatchError, match=f"address from {missing}"):
        executor.start()


def test_start_names_a_scheduler_that_does_not_answer() -> None:
    import dask.config

    workers = WorkersConfig(executor="dask", scheduler_address="tcp://127.0.0.1:9")
    with dask.config.set({"distributed.comm.timeouts.connect": "1s"}):
        executor = DaskExecutor(workers, ["emr"], lambda batch_id, future: None)
    with pytest.raises(
        MedbatchError, match=r"cannot reach the Dask scheduler at tcp://127\.0\.0\.1:9 within 1s"
    ):
        executor.start()

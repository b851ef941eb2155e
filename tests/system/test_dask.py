"""The Dask executor end to end: the real service against `dask scheduler` and `dask worker`
subprocesses on 127.0.0.1 (each test starts its own cluster and kills it at the end)."""

from __future__ import annotations

import contextlib
import json
import os
import random
import signal
import subprocess
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import pandas as pd
import pytest

from tests.support.accounting import check_accounting
from tests.support.data import emr_csv
from tests.support.service import REPO, Service
from tests.support.waiting import wait_until
from tests.system.conftest import MakeService
from tests.system.test_emr_pipeline import NUMERIC, emr, expected_means

pytest.importorskip("distributed")

DASK = Path(sys.executable).with_name("dask")
# A worker that dies fails its task at once (KilledWorker) instead of the scheduler re-running
# it silently, so medbatch's retry rules and audit log apply (as the README's Dask section says).
SCHEDULER_ENV = {"DASK_DISTRIBUTED__SCHEDULER__ALLOWED_FAILURES": "0"}
# Run in a subprocess, so that no Dask client, thread or warning lives in the test process.
PROCESSING = """
import json, sys
from distributed import Client
with Client(scheduler_file=sys.argv[1], timeout=10, set_as_default=False) as client:
    print(json.dumps({a: list(keys) for a, keys in client.processing().items()}))
"""


def _children(pid: int) -> list[int]:
    found = []
    for task in Path(f"/proc/{pid}/task").glob("*"):
        with contextlib.suppress(OSError):
            found += [int(c) for c in (task / "children").read_text().split()]
    return found


class Cluster:
    """A scheduler and single-threaded workers (each under its nanny), one process group each."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.scheduler_file = root / "scheduler.json"
        self.processes: list[subprocess.Popen[bytes]] = []
        self.logs: dict[int, Path] = {}
        self.nannies: list[int] = []
        root.mkdir(parents=True, exist_ok=True)

    def start(self, workers: int = 2, prefix: Sequence[str] = ()) -> None:
        self.scheduler_file.unlink(missing_ok=True)
        args = ["--scheduler-file", str(self.scheduler_file), "--no-dashboard"]
        self._spawn("scheduler", ["scheduler", "--host", "127.0.0.1", "--port", "0", *args])
        wait_until(self.scheduler_file.exists, 30, message="the scheduler file")
        new = []
        for _ in range(workers):
            worker = ["worker", "--nworkers", "1", "--nthreads", "1", "--host", "127.0.0.1"]
            scratch = ["--local-directory", str(self.root / "scratch")]
            new.append(self._spawn("worker", [*worker, *args, *scratch], prefix).pid)
        self.nannies += new
        wait_until(
            lambda: all("Registered to:" in self.logs[pid].read_text() for pid in new),
            30,
            message="the workers",
        )

    def _spawn(
        self, name: str, args: list[str], prefix: Sequence[str] = ()
    ) -> subprocess.Popen[bytes]:
        log = self.root / f"{name}-{len(self.processes) + 1}.log"
        with log.open("wb") as out:
            process = subprocess.Popen(
                [*prefix, str(DASK), *args],
                cwd=REPO,
                stdout=out,
                stderr=subprocess.STDOUT,
                # The workers run the code under test (the console script does not put the
                # working folder on sys.path; an installed medbatch may be another checkout).
                env={**os.environ, **SCHEDULER_ENV, "PYTHONPATH": str(REPO)},
                start_new_session=True,
            )
        self.processes.append(process)
        self.logs[process.pid] = log
        return process

    def worker_pids(self) -> dict[str, int]:
        """Address → pid of each live worker process (the nanny's child running the tasks)."""
        found = {}
        for nanny in self.nannies:
            log = self.logs[nanny].read_text().splitlines()
            starts = [line for line in log if "Start worker at:" in line]
            for child in _children(nanny):
                with contextlib.suppress(OSError):
                    if b"spawn_main" in Path(f"/proc/{child}/cmdline").read_bytes() and starts:
                        found[starts[-1].split()[-1]] = child
        return found

    def freeze(self) -> None:
        for pid in self.worker_pids().values():
            os.kill(pid, signal.SIGSTOP)

    def thaw(self) -> None:
        for pid in self.worker_pids().values():
            os.kill(pid, signal.SIGCONT)

    def busy_workers(self) -> list[str]:
        """Addresses of the workers the scheduler has given a medbatch batch to."""
        done = subprocess.run(
            [sys.executable, "-c", PROCESSING, str(self.scheduler_file)],
            capture_output=True,
            text=True,
            timeout=30,
            check=True,
        )
        processing: dict[str, list[str]] = json.loads(done.stdout)
        return sorted(a for a, keys in processing.items() if any("medbatch-" in k for k in keys))

    def kill(self) -> None:
        for process in self.processes:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGKILL)
            process.wait(timeout=10)
        self.processes.clear()
        self.nannies.clear()


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[Cluster]:
    made = Cluster(tmp_path / "dask")
    yield made
    made.kill()


def on_dask(cluster: Cluster, count: int = 2) -> dict[str, Any]:
    return {"executor": "dask", "scheduler_file": str(cluster.scheduler_file), "count": count}


def events(service: Service, name: str, **facts: object) -> list[dict[str, Any]]:
    return [
        a
        for a in service.audit()
        if a["event"] == name and all(a.get(k) == v for k, v in facts.items())
    ]


def logged(service: Service, event: str) -> bool:
    return any(line.get("event") == event for line in service.logs())


def test_emr_batches_on_dask_publish_exact_means(
    make_service: MakeService, cluster: Cluster
) -> None:
    """EMR files run on a Dask worker come out as one batch whose means equal pandas'."""
    cluster.start()
    service = make_service([emr(max_files=8)], workers=on_dask(cluster))
    service.start()
    rng = random.Random(11)
    contents = [emr_csv(rng, rows=40, missing_every=7) for _ in range(8)]
    dropped = {
        f"visit{i}.csv": service.drop("emr", f"visit{i}.csv", c) for i, c in enumerate(contents)
    }

    manifest = wait_until(lambda: service.manifests("emr"), 60)[0]
    assert service.stop() == 0

    assert logged(service, "dask.connected")
    assert sorted(i["name"] for i in manifest["inputs"]) == sorted(dropped)
    result = pd.read_csv(service.outbox / "emr" / manifest["batch_id"] / "result.csv")
    assert list(result.columns) == ["diagnosis", "n", *[f"mean_{c}" for c in NUMERIC], "suppressed"]
    assert not result.pop("suppressed").any()
    pd.testing.assert_frame_equal(result, expected_means(contents), check_exact=False, rtol=1e-12)
    check_accounting(service, dropped)


def test_urgent_batch_overtakes_the_routine_backlog_with_one_slot(
    make_service: MakeService, cluster: Cluster
) -> None:
    """With one batch in flight, an urgent batch sealed after a routine backlog runs next."""
    cluster.start()
    service = make_service(
        [emr(name="routine", priority=5, max_files=1), emr(name="urgent", priority=1, max_files=1)],
        workers=on_dask(cluster, count=1),
    )
    service.start()
    rng = random.Random(12)
    # Given: frozen workers, so that the first routine batch stays in flight and the next ones
    # queue up in medbatch's dispatcher (Dask never holds more than the one)
    cluster.freeze()
    dropped = {}
    for i in range(5):
        dropped[f"r{i}.csv"] = service.drop("routine", f"r{i}.csv", emr_csv(rng))
        wait_until(lambda i=i: len(events(service, "batch.sealed", pipeline="routine")) > i, 20)
    dropped["u.csv"] = service.drop("urgent", "u.csv", emr_csv(rng))
    wait_until(lambda: events(service, "batch.sealed", pipeline="urgent"), 20)

    # When: the workers run again
    cluster.thaw()

    # Then: the urgent batch is published right after the one that was in flight
    wait_until(lambda: len(service.manifests()) == 6, 60, message="six batches published")
    assert service.stop() == 0
    order = [m["pipeline"] for m in service.manifests()]
    assert order == ["routine", "urgent", "routine", "routine", "routine", "routine"]
    check_accounting(service, dropped)


def test_killed_dask_worker_mid_batch_is_retried_and_every_input_accounted(
    make_service: MakeService, cluster: Cluster
) -> None:
    """kill -9 of the Dask worker running a batch: the batch is retried (worker_crash) on the
    cluster and every input ends in exactly one published batch."""
    cluster.start()
    service = make_service([emr(max_files=200, max_wait=2)], workers=on_dask(cluster))
    service.start()
    rng = random.Random(13)
    dropped = {f"f{i}.csv": service.drop("emr", f"f{i}.csv", emr_csv(rng)) for i in range(400)}
    wait_until(lambda: events(service, "batch.started"), 30)

    # When: the workers freeze mid-batch and the one running a batch is killed
    cluster.freeze()
    busy = wait_until(cluster.busy_workers, 30, message="a worker running a batch")
    os.kill(cluster.worker_pids()[busy[0]], signal.SIGKILL)
    cluster.thaw()

    # Then
    wait_until(lambda: service.accounted() == len(dropped), 120, message="all accounted")
    assert service.stop() == 0
    retried = events(service, "batch.retried")
    assert retried, "the killed batch was not retried"
    assert {a["reason"] for a in retried} == {"worker_crash"}
    check_accounting(service, dropped)


def test_scheduler_loss_keeps_the_service_running_and_it_reconnects(
    make_service: MakeService, cluster: Cluster
) -> None:
    """The whole cluster dies with a batch in flight and comes back on another port: the
    service keeps running, reconnects through the scheduler file and accounts for everything."""
    cluster.start()
    service = make_service([emr(max_files=100, max_wait=2)], workers=on_dask(cluster))
    service.start()
    rng = random.Random(14)
    dropped = {f"f{i}.csv": service.drop("emr", f"f{i}.csv", emr_csv(rng)) for i in range(200)}
    wait_until(lambda: events(service, "batch.started"), 30)

    # When: the cluster is killed with the batch in flight
    cluster.freeze()
    cluster.kill()
    wait_until(lambda: logged(service, "dask.disconnected"), 30)
    wait_until(lambda: events(service, "batch.retried", reason="executor_unavailable"), 30)
    assert service.process is not None and service.process.poll() is None

    # Then: a new cluster (new port, same scheduler file) picks the work up
    cluster.start()
    wait_until(lambda: service.accounted() == len(dropped), 120, message="all accounted")
    assert logged(service, "dask.reconnected")
    assert service.stop() == 0
    check_accounting(service, dropped)


PROBE = """
import sys
from pathlib import Path
from daemon.config import PathsConfig, WorkersConfig
from daemon.errors import MedbatchError
from daemon.executors.dask import DaskExecutor

root, scheduler_file = Path(sys.argv[1]), Path(sys.argv[2])
paths = PathsConfig(
    inbox=root / "inbox", outbox=root / "outbox", state=root / "state",
    quarantine=root / "quarantine",
)
workers = WorkersConfig(executor="dask", scheduler_file=scheduler_file)
executor = DaskExecutor(workers, ["emr"], lambda batch_id, future: None, paths=paths)
try:
    executor.start()
except MedbatchError as exc:
    print(exc)
    sys.exit(1)
executor.shutdown(wait=True)
print("ok")
"""


def run_probe(root: Path, cluster: Cluster) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", PROBE, str(root), str(cluster.scheduler_file)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


@pytest.mark.root
@pytest.mark.skipif(os.geteuid() != 0, reason="a worker with its own mounts needs root")
def test_start_fails_when_a_worker_cannot_see_the_spool(tmp_path: Path, cluster: Cluster) -> None:
    """A worker whose state folder is not the service's (an empty tmpfs in its own mount
    namespace) makes start-up fail with a message naming the spool; the same worker without
    that mount passes."""
    for folder in ("inbox", "outbox", "state/spool", "quarantine"):
        (tmp_path / folder).mkdir(parents=True)
    state = tmp_path / "state"
    namespace = ["unshare", "--mount", "--propagation", "private"]
    cluster.start(workers=1, prefix=namespace)
    healthy = run_probe(tmp_path, cluster)
    assert healthy.returncode == 0, healthy.stdout + healthy.stderr
    assert healthy.stdout.splitlines()[-1] == "ok"
    cluster.kill()

    mount = f'mount -t tmpfs medbatch-test "{state}" && exec "$0" "$@"'
    cluster.start(workers=1, prefix=[*namespace, "sh", "-c", mount])
    done = run_probe(tmp_path, cluster)

    assert done.returncode == 1, done.stdout + done.stderr
    assert f"cannot see the spool {state / 'spool'}" in done.stdout
    assert not list((state / "spool").iterdir()), "the probe left its marker in the spool"
    assert not list((tmp_path / "outbox").iterdir()), "the probe left a file in the outbox"


def test_hung_batch_times_out_its_worker_is_restarted_and_work_goes_on(
    make_service: MakeService, cluster: Cluster
) -> None:
    """A batch that hangs on a Dask worker fails after batch_timeout_s (its worker restarted
    through its nanny), is retried once and quarantined; the cluster keeps publishing."""
    cluster.start()
    faulty = {"name": "faulty", "kind": "faulty", "max_files": 1, "settle_s": 0.1}
    workers = {**on_dask(cluster), "batch_timeout_s": 2}
    service = make_service([faulty], workers=workers)
    service.start()
    # SLEEP, not HANG: HANG's signal.signal() only works in a main thread, and Dask runs tasks
    # in a worker thread.
    hang = b"MEDBATCH-TEST-SLEEP-3600\n"
    dropped = {"hang.txt": service.drop("faulty", "hang.txt", hang)}

    wait_until(lambda: service.accounted() == 1, 60, message="the hung batch quarantined")
    dropped["ok.txt"] = service.drop("faulty", "ok.txt", b"one\ntwo\n")
    wait_until(lambda: service.accounted() == 2, 30, message="the next batch published")
    assert service.stop() == 0

    assert [a["reason"] for a in events(service, "batch.retried")] == ["timeout"]
    assert [q["name"] for q in service.quarantined()] == ["hang.txt"]
    assert [i["name"] for i in service.published_inputs()] == ["ok.txt"]
    timeouts = [line for line in service.logs() if line.get("event") == "dask.batch_timeout"]
    assert [len(line["workers"]) for line in timeouts] == [1, 1], "the hung workers were not found"
    assert not logged(service, "dask.timeout_worker_not_restarted")
    check_accounting(service, dropped)


def test_library_logs_on_a_dask_worker_leave_no_metadata(
    make_service: MakeService, cluster: Cluster
) -> None:
    """A Dask worker is not ours to configure, yet a library it runs for us speaks there: the
    canaries of every image format's metadata appear in no worker's or scheduler's log."""
    from tests.security.test_metadata_canaries import CONTENT_CANARIES
    from tests.security.test_metadata_canaries import files as canary_files

    cluster.start(workers=1)
    service = make_service(
        [{"name": "imaging", "kind": "imaging", "max_files": 100, "max_wait": 1, "settle_s": 0.1}],
        workers=on_dask(cluster, count=1),
    )
    service.start()
    content = canary_files()
    dropped = {name: service.drop("imaging", name, data) for name, data in content.items()}
    wait_until(lambda: service.accounted() == len(content), 90, message="all accounted")
    assert service.stop() == 0

    assert events(service, "batch.published"), "the batch ran on the cluster"
    worker_logs = "\n".join(p.read_text(errors="replace") for p in cluster.logs.values())
    found = [c for c in CONTENT_CANARIES if c in worker_logs]
    assert not found, f"on the cluster's logs: {found}"
    assert "CNRYFNAME" not in worker_logs
    # tifffile spoke on the worker (it fails on the ImageJ tags): as a code, never its text
    spoken = [line for line in worker_logs.splitlines() if "tifffile" in line]
    assert spoken, "the library record the corpus provokes"
    for line in spoken:
        record = json.loads(line)
        assert record["event"] == "library.record", line
        assert set(record) == {"event", "logger", "level", "code", "timestamp"}
    check_accounting(service, dropped)

"""DaskCluster: `dask scheduler` and N single-threaded `dask worker`s on 127.0.0.1, as
subprocesses sharing a scheduler file, for the `--executor dask` runs. Killed on exit, always."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from types import TracebackType

from bench.service import REPO

DASK = Path(sys.executable).with_name("dask")


class DaskCluster:
    def __init__(self, root: Path, workers: int = 2) -> None:
        self.root = root
        self.workers = workers
        self.scheduler_file = root / "dask-scheduler.json"
        self._processes: list[subprocess.Popen[bytes]] = []

    def __enter__(self) -> DaskCluster:
        try:
            self.start()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.stop()

    def _spawn(self, name: str, *args: str) -> None:
        log = (self.root / f"{name}.log").open("wb")
        with log:
            self._processes.append(
                subprocess.Popen(
                    [str(DASK), *args],
                    cwd=REPO,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    start_new_session=True,
                )
            )

    def start(self, timeout_s: float = 60) -> None:
        if not DASK.exists():
            raise RuntimeError(f"{DASK} not found: pip install -e '.[dask]'")
        common = ["--scheduler-file", str(self.scheduler_file)]
        self._spawn(
            "scheduler", "scheduler", *common, "--host", "127.0.0.1", "--port", "0",
            "--no-dashboard",
        )  # fmt: skip
        self._wait_for(self.scheduler_file.exists, timeout_s, "the scheduler file")
        for i in range(self.workers):
            self._spawn(
                f"worker-{i}", "worker", *common, "--nworkers", "1", "--nthreads", "1",
                "--host", "127.0.0.1", "--no-dashboard", "--local-directory", str(self.root),
            )  # fmt: skip
        self._wait_for(lambda: self.n_workers() >= self.workers, timeout_s, "the workers")

    def pids(self) -> list[int]:
        """The scheduler's and the workers' (nanny) processes; their children are the workers."""
        return [process.pid for process in self._processes]

    def n_workers(self) -> int:
        from distributed import Client

        with Client(  # type: ignore[no-untyped-call]
            scheduler_file=str(self.scheduler_file), timeout=10
        ) as client:
            return len(client.scheduler_info(n_workers=-1)["workers"])

    def _wait_for(self, predicate: Callable[[], bool], timeout_s: float, what: str) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            for process in self._processes:
                if process.poll() is not None:
                    raise RuntimeError(f"a dask process exited {process.returncode} ({what})")
            with contextlib.suppress(OSError, TimeoutError):
                if predicate():
                    return
            time.sleep(0.2)
        raise TimeoutError(f"dask: no {what} within {timeout_s} s")

    def stop(self) -> None:
        for process in reversed(self._processes):
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(process.pid, signal.SIGTERM)
        for process in reversed(self._processes):
            try:
                process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.killpg(process.pid, signal.SIGKILL)
                process.wait(timeout=10)
        self._processes.clear()

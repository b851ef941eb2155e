"""DaskExecutor: runs each batch attempt on a dask.distributed cluster that shares our storage.

Main process: the main loop submits; Dask's callback thread completes attempts; a monitor thread
reconnects, sends what waited for the scheduler, and fails what the cluster lost or overran.
"""

from __future__ import annotations

import contextlib
import itertools
import threading
import time
from collections.abc import Iterable
from concurrent.futures import CancelledError, Future
from dataclasses import dataclass
from functools import partial
from typing import cast

import structlog

from daemon.config import PathsConfig, WorkersConfig
from daemon.errors import MedbatchError
from daemon.executors import DoneCallback
from daemon.executors.dask.client import (
    ClusterLostError,
    DaskClient,
    DaskFuture,
    EventLoop,
    connect_timeout_s,
    count_workers,
    import_distributed,
    scheduler_address,
)
from daemon.executors.dask.probe import probe_cluster
from daemon.models import BatchResult, BatchTask
from daemon.worker import run_batch

log = structlog.get_logger()


_POLL_S = 0.5
_RECONCILE_S = 10.0  # how often to ask the scheduler about attempts it may have forgotten
_GATHER_TIMEOUT_S = 60.0  # fetching a finished attempt's small summary
_RECONNECT_TIMEOUT_S = 5.0  # per try; the monitor keeps trying


@dataclass
class _Attempt:
    task: BatchTask
    future: Future[BatchResult]
    dask_future: DaskFuture | None = None  # None: waiting for the scheduler
    submitted_at: float = 0.0


# -- the shared-storage probe --------------------------------------------------------------


class DaskExecutor:
    def __init__(
        self,
        workers: WorkersConfig,
        kinds: Iterable[str],
        on_done: DoneCallback,
        *,
        paths: PathsConfig | None = None,
    ) -> None:
        distributed = import_distributed()
        self._distributed = distributed
        self._loss_types: tuple[type[BaseException], ...] = (
            ClusterLostError,
            CancelledError,  # distributed.FutureCancelledError is one
            distributed.KilledWorker,
            distributed.comm.CommClosedError,
        )
        self._settings = workers
        self._kinds = tuple(sorted(set(kinds)))
        self._on_done = on_done
        self._paths = paths
        self._timeout_s = connect_timeout_s()
        self._lock = threading.Lock()
        self._attempts: dict[str, _Attempt] = {}
        self._serial = itertools.count(1)
        self._loop: EventLoop | None = None
        self._client: DaskClient | None = None
        self._address = ""
        self._stop = threading.Event()
        self._monitor: threading.Thread | None = None
        self._n_workers = 0
        self._is_connected = False
        self._next_reconcile = 0.0
        self._next_connect = 0.0

    def start(self) -> None:
        self._loop = EventLoop()
        try:
            self._client = client = self._connect(self._timeout_s)
            try:
                client.wait_for_workers(1, timeout=self._timeout_s)
            except TimeoutError:
                raise MedbatchError(
                    f"no Dask worker joined the scheduler at {self._address} "
                    f"within {self._timeout_s:g}s"
                ) from None
            if self._paths is None:
                log.warning("dask.probe_skipped", reason="the executor was given no paths")
            else:
                probe_cluster(partial(client.run, on_error="return"), self._paths, self._kinds)
            self._check_allowed_failures(client)
            self._n_workers = count_workers(client)
        except BaseException:
            self.shutdown(wait=False)
            raise
        self._is_connected = True
        self._monitor = threading.Thread(
            target=self._watch, name="medbatch-dask-monitor", daemon=True
        )
        self._monitor.start()
        log.info("dask.connected", scheduler=self._address, workers=self._n_workers)

    def submit(self, task: BatchTask) -> None:
        assert self._loop is not None, "start() first"
        future: Future[BatchResult] = Future()
        future.set_running_or_notify_cancel()
        batch_id = task.batch.batch_id
        future.add_done_callback(lambda f: self._on_done(batch_id, f))
        # Unique per submission: an attempt that did not count comes back with the same number,
        # and Client.submit hands back the old future for a key it still holds.
        key = f"medbatch-{batch_id}-{task.batch.attempt}-{next(self._serial)}"
        client = self._client
        with self._lock:
            self._attempts[key] = attempt = _Attempt(task, future)
            if client is not None and client.status == "running":
                self._send(client, key, attempt)
        # Otherwise the monitor sends it once the scheduler is back.

    def is_worker_loss(self, exc: BaseException) -> bool:
        return isinstance(exc, self._loss_types)

    def recover(self) -> None:
        """Nothing to do: the cluster replaces its workers and the monitor reconnects."""

    def is_healthy(self) -> bool:
        client = self._client
        return client is not None and client.status == "running" and self._n_workers > 0

    def has_lost_work(self) -> bool:
        # A lost connection is re-sent by the watcher thread; a Dask attempt may complete later.
        return False

    def worker_pids(self) -> list[int]:
        return []

    def reconfigure(self, workers: int, kinds: Iterable[str]) -> None:
        """The dispatcher bounds the batches in flight; the cluster's size is its own."""
        self._kinds = tuple(sorted(set(kinds)))

    def shutdown(self, *, wait: bool) -> None:
        """Closing the client releases its keys: the scheduler drops what it still holds.

        `wait` is moot: the service has drained what it wanted to finish; a batch still
        running stays "running" in the journal and the next start re-runs it.
        """
        self._stop.set()
        if self._monitor is not None:
            self._monitor.join(timeout=2 * _RECONNECT_TIMEOUT_S + _POLL_S)
            self._monitor = None
        for key in list(self._attempts):
            self._settle(key, ClusterLostError("the executor shut down"))
        if self._client is not None:
            try:
                self._client.close(timeout=_RECONNECT_TIMEOUT_S)
            except Exception as exc:
                log.warning("dask.close_failed", error=repr(exc))
            self._client = None
        if self._loop is not None:
            self._loop.stop()
            self._loop = None

    def _connect(self, timeout_s: float) -> DaskClient:
        assert self._loop is not None
        address = scheduler_address(self._settings)
        try:
            client = self._distributed.Client(
                address,
                loop=self._loop.loop,
                timeout=timeout_s,
                set_as_default=False,
                name="medbatch",
            )
        except (OSError, TimeoutError, ValueError) as exc:
            raise MedbatchError(
                f"cannot reach the Dask scheduler at {address} within {timeout_s:g}s ({exc})"
            ) from None
        self._address = address
        return cast(DaskClient, client)

    def _check_allowed_failures(self, client: DaskClient) -> None:
        """With allowed-failures > 0 the scheduler silently re-runs a batch whose worker died,
        outside medbatch's retry rules and audit log."""
        import dask.config

        try:
            allowed = client.run_on_scheduler(
                dask.config.get, "distributed.scheduler.allowed-failures"
            )
        except Exception as exc:
            log.info("dask.allowed_failures_unknown", error=repr(exc))
            return
        if allowed:
            log.warning("dask.allowed_failures", allowed_failures=allowed, advice="set it to 0")

    # -- attempts ------------------------------------------------------------------------

    def _send(self, client: DaskClient, key: str, attempt: _Attempt) -> None:
        """With self._lock held."""
        attempt.dask_future = client.submit(
            run_batch,
            attempt.task,
            key=key,
            pure=False,
            # Dask runs higher numbers first; medbatch's 1 is the most urgent.
            priority=-attempt.task.batch.priority,
            retries=0,
        )
        attempt.submitted_at = time.monotonic()
        attempt.dask_future.add_done_callback(partial(self._on_dask_done, key))

    def _on_dask_done(self, key: str, dask_future: DaskFuture) -> None:
        """Dask's callback thread: the attempt's outcome, or why the cluster lost it."""
        outcome: BatchResult | BaseException
        try:
            outcome = dask_future.result(timeout=_GATHER_TIMEOUT_S)
        except Exception as exc:
            if dask_future.status == "error":
                outcome = exc  # raised by the batch, or KilledWorker
            else:
                outcome = ClusterLostError(str(getattr(exc, "reason", None) or repr(exc)))
        self._settle(key, outcome)

    def _settle(self, key: str, outcome: BatchResult | BaseException) -> None:
        """Complete an attempt once; whoever comes second (a late Dask callback) is ignored."""
        with self._lock:
            attempt = self._attempts.pop(key, None)
        if attempt is not None:
            _complete(attempt, outcome)

    def _take(self, key: str) -> _Attempt | None:
        with self._lock:
            return self._attempts.pop(key, None)

    # -- the monitor thread --------------------------------------------------------------

    def _watch(self) -> None:
        while not self._stop.wait(_POLL_S):
            try:
                self._check()
            except Exception:
                log.exception("dask.monitor_failed")

    def _check(self) -> None:
        client = self._client
        status = client.status if client is not None else "closed"
        if client is not None and status == "running":
            if not self._is_connected:
                log.info("dask.reconnected", scheduler=self._address)
                self._is_connected = True
            self._n_workers = count_workers(client)
            with self._lock:
                for key, attempt in self._attempts.items():
                    if attempt.dask_future is None:
                        self._send(client, key, attempt)
            self._expire(client)
            self._reconcile(client)
            return
        if self._is_connected:
            # The client has cancelled every future it held: those attempts come back as
            # ClusterLostError through the callback thread.
            log.warning("dask.disconnected", scheduler=self._address, status=status)
            self._is_connected = False
        # A client reconnects by itself to the same address, within its timeout.
        if status != "connecting" or self._has_moved():
            self._reconnect(client)

    def _has_moved(self) -> bool:
        """A scheduler restarted on another port: its scheduler file says where it went."""
        if self._settings.scheduler_address or self._settings.scheduler_file is None:
            return False
        try:
            return scheduler_address(self._settings) != self._address
        except MedbatchError:
            return False

    def _reconnect(self, old: DaskClient | None) -> None:
        if time.monotonic() < self._next_connect:
            return
        self._next_connect = time.monotonic() + _RECONNECT_TIMEOUT_S
        with self._lock:
            sent = [key for key, a in self._attempts.items() if a.dask_future is not None]
        for key in sent:  # sent through a client that is gone: nothing will come back
            self._settle(key, ClusterLostError("scheduler-connection-lost"))
        if old is not None:
            self._client = None
            with contextlib.suppress(Exception):
                old.close(timeout=_RECONNECT_TIMEOUT_S)
        try:
            self._client = self._connect(_RECONNECT_TIMEOUT_S)
        except MedbatchError as exc:
            log.info("dask.reconnect_failed", error=str(exc))

    def _expire(self, client: DaskClient) -> None:
        """A batch over batch_timeout_s: stop its worker (through its nanny), then fail it."""
        limit_s = self._settings.batch_timeout_s
        now = time.monotonic()
        with self._lock:
            late = [
                key
                for key, a in self._attempts.items()
                if a.dask_future is not None and now - a.submitted_at > limit_s
            ]
        for key in late:
            attempt = self._take(key)  # before the cancel, whose callback would report it lost
            if attempt is None or attempt.dask_future is None:
                continue
            where = [addr for addr, keys in client.processing().items() if key in keys]
            # Cancel first, so that the scheduler does not hand the batch to another worker
            # when this one goes; a running task cannot be interrupted, its process can.
            attempt.dask_future.cancel(reason="medbatch-batch-timeout")
            if where:
                restarted = client.restart_workers(where, raise_for_error=False)
                if any(state != "OK" for state in restarted.values()):
                    log.error("dask.timeout_worker_not_restarted", workers=dict(restarted))
            log.warning("dask.batch_timeout", key=key, workers=where, timeout_s=limit_s)
            _complete(attempt, TimeoutError(f"ran longer than batch_timeout_s ({limit_s:g}s)"))

    def _reconcile(self, client: DaskClient) -> None:
        """A key the scheduler no longer knows will never complete: fail its attempt."""
        now = time.monotonic()
        if now < self._next_reconcile:
            return
        self._next_reconcile = now + _RECONCILE_S
        with self._lock:
            keys = [
                key
                for key, a in self._attempts.items()
                if a.dask_future is not None and now - a.submitted_at > _RECONCILE_S
            ]
        if not keys:
            return
        states = client.sync(
            client.scheduler.get_task_status, keys=keys, callback_timeout=_RECONNECT_TIMEOUT_S
        )
        for key in keys:
            if states.get(key) in (None, "forgotten"):
                log.warning("dask.key_forgotten", key=key)
                self._settle(key, ClusterLostError("the scheduler forgot it"))


def _complete(attempt: _Attempt, outcome: BatchResult | BaseException) -> None:
    if isinstance(outcome, BaseException):
        attempt.future.set_exception(outcome)
    else:
        attempt.future.set_result(outcome)

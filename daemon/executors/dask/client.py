"""The Dask client as the executor uses it: typed protocols, the event loop thread it runs on,
and how the scheduler is found. Main process; `distributed` is imported only when used.
"""

from __future__ import annotations

import asyncio
import json
import logging
import threading
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING, Any, Protocol

from daemon.config import WorkersConfig
from daemon.errors import ExecutorUnavailableError, MedbatchError

if TYPE_CHECKING:
    from tornado.ioloop import IOLoop


class ClusterLostError(ExecutorUnavailableError):
    """The Dask cluster lost this attempt (scheduler gone, connection lost, key forgotten)."""

    def __init__(self, reason: str) -> None:
        self.reason = reason
        super().__init__(f"the Dask cluster lost this attempt: {reason}")


class DaskFuture(Protocol):
    status: str

    def result(self, timeout: float | None = None) -> Any: ...

    def add_done_callback(self, fn: Callable[[Any], None]) -> None: ...

    def cancel(self, reason: str | None = None, msg: str | None = None) -> None: ...


class DaskClient(Protocol):
    """What medbatch uses of `distributed.Client`."""

    status: str
    scheduler: Any

    def submit(self, func: Callable[..., Any], *args: Any, **kwargs: Any) -> DaskFuture: ...

    def run(self, function: Callable[..., Any], *args: Any, **kwargs: Any) -> Any: ...

    def run_on_scheduler(self, function: Callable[..., Any], *args: Any) -> Any: ...

    def wait_for_workers(self, n_workers: int, timeout: float | None = None) -> None: ...

    def scheduler_info(self, n_workers: int = -1) -> Mapping[str, Any]: ...

    def processing(self) -> Mapping[str, Iterable[str]]: ...

    def restart_workers(
        self, workers: list[str], timeout: float = ..., raise_for_error: bool = ...
    ) -> Mapping[str, str]: ...

    def sync(self, func: Callable[..., Any], *args: Any, **kwargs: Any) -> Any: ...

    def close(self, timeout: float = ...) -> None: ...


def scheduler_address(settings: WorkersConfig) -> str:
    if settings.scheduler_address:
        return settings.scheduler_address
    # Read it here: Client(scheduler_file=...) waits forever for a file that is missing.
    path = settings.scheduler_file
    try:
        return str(json.loads(Path(str(path)).read_text(encoding="utf-8"))["address"])
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise MedbatchError(
            f"cannot read the Dask scheduler's address from {path} ({exc!r})"
        ) from None


class EventLoop:
    """The one event loop thread every Client of this executor runs on: a Client that starts its
    own leaves that thread behind when it fails to connect or gives up reconnecting."""

    loop: IOLoop
    _done: asyncio.Event

    def __init__(self) -> None:
        from tornado.ioloop import IOLoop

        ready = threading.Event()

        async def main() -> None:
            self.loop = IOLoop.current()
            self._done = asyncio.Event()
            ready.set()
            await self._done.wait()

        self._thread = threading.Thread(
            target=asyncio.run, args=(main(),), name="medbatch-dask-loop", daemon=True
        )
        self._thread.start()
        if not ready.wait(timeout=10):
            raise MedbatchError("the Dask client's event loop did not start")

    def stop(self) -> None:
        self.loop.add_callback(self._done.set)
        self._thread.join(timeout=10)


def count_workers(client: DaskClient) -> int:
    return int(client.scheduler_info(n_workers=0).get("n_workers", 0))


def import_distributed() -> ModuleType:
    try:
        import distributed
    except ImportError:
        raise MedbatchError(
            "workers.executor = 'dask' needs dask.distributed: pip install 'medbatch[dask]'"
        ) from None
    # Importing distributed sets its loggers back to INFO (distributed/config.py): keep the
    # WARNING floor that daemon/logs.py gives libraries.
    floor = max(logging.WARNING, logging.getLogger().getEffectiveLevel())
    logging.getLogger("distributed").setLevel(floor)
    return distributed


def connect_timeout_s() -> float:
    import dask.config
    from dask.utils import parse_timedelta

    return float(parse_timedelta(dask.config.get("distributed.comm.timeouts.connect"), "s"))

"""sd_notify through the real service: the test holds the $NOTIFY_SOCKET datagram socket."""

from __future__ import annotations

import itertools
import random
import re
import signal
import socket
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator
from datetime import datetime
from pathlib import Path

import pytest

from tests.support.data import emr_csv
from tests.support.service import Service
from tests.support.waiting import wait_until
from tests.system.conftest import MakeService

# systemd's watchdog: the service pings at half of it, here every second.
WATCHDOG_USEC = 2_000_000
PING_S = WATCHDOG_USEC / 2 / 1e6
STATUS_RE = re.compile(r"^STATUS=\d+ settling, \d+ waiting, \d+ in flight, \d+ published$")


class NotifyListener:
    """Collects (wall time, monotonic time, datagram) from a bound AF_UNIX datagram socket."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._socket = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self._socket.bind(str(path))
        self._socket.settimeout(0.05)
        self._lock = threading.Lock()
        self._messages: list[tuple[float, float, str]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="notify-listener")
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                data = self._socket.recv(4096)
            except TimeoutError:
                continue
            with self._lock:
                self._messages.append((time.time(), time.monotonic(), data.decode()))

    def messages(self) -> list[tuple[float, float, str]]:
        with self._lock:
            return list(self._messages)

    def texts(self) -> list[str]:
        return [text for _, _, text in self.messages()]

    def index_of(self, predicate: Callable[[str], bool], start: int = 0) -> int | None:
        for i, text in enumerate(self.texts()[start:], start):
            if predicate(text):
                return i
        return None

    def wait_for(self, text: str, start: int = 0, timeout_s: float = 30) -> int:
        """Index of the first message equal to `text` (or starting with `text` + newline)."""
        return wait_until(
            lambda: self.index_of(lambda t: t == text or t.startswith(text + "\n"), start),
            timeout_s,
            message=f"{text!r} on the notify socket",
        )

    def pings(self, since_monotonic: float = 0.0) -> list[float]:
        return [
            m for _, m, text in self.messages() if text == "WATCHDOG=1" and m >= since_monotonic
        ]

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
        self._socket.close()


@pytest.fixture
def listener(tmp_path: Path) -> Iterator[NotifyListener]:
    notify = NotifyListener(tmp_path / "notify.sock")
    yield notify
    notify.close()


def emr(**overrides: object) -> dict[str, object]:
    return {
        "name": "emr",
        "kind": "emr",
        "max_files": 1000,
        "max_wait": 600,
        "settle_s": 0.1,
        **overrides,
    }


def start_notified(service: Service, listener: NotifyListener) -> None:
    service.start(env={"NOTIFY_SOCKET": str(listener.path), "WATCHDOG_USEC": str(WATCHDOG_USEC)})


def log_time(service: Service, event: str) -> float:
    line = next(line for line in service.logs() if line.get("event") == event)
    return datetime.fromisoformat(line["timestamp"]).timestamp()


def test_ready_watchdog_status_reload_and_stop(
    make_service: MakeService, listener: NotifyListener
) -> None:
    """READY=1 after the start-up scan of a full inbox; pings every second; STATUS; RELOADING=1
    with MONOTONIC_USEC then READY=1 on SIGHUP; STOPPING=1 on SIGTERM."""
    # Given an inbox holding 20 files before the service starts
    service = make_service([emr()])
    rng = random.Random(11)
    for i in range(20):
        service.drop("emr", f"visit{i}.csv", emr_csv(rng))

    # When it starts under a (test-held) notify socket with a watchdog
    start_notified(service, listener)

    # Then READY=1 comes once, after daemon.started, with the whole backlog already seen
    ready = listener.wait_for("READY=1")
    ready_wall = listener.messages()[ready][0]
    ready_line = next(line for line in service.logs() if line["event"] == "daemon.ready")
    assert ready_line["backlog"] == 20
    started = next(a for a in service.audit() if a["event"] == "daemon.started")
    assert datetime.fromisoformat(started["ts"]).timestamp() <= ready_wall
    assert log_time(service, "daemon.ready") <= ready_wall
    assert listener.texts().count("READY=1") == 1
    # … and the 20 files are taken after it
    wait_until(lambda: len(service.journal("SELECT id FROM files WHERE state='received'")) == 20)

    # And the watchdog pings repeat at the half-interval, with STATUS lines
    after_ready = listener.messages()[ready][1]
    wait_until(lambda: len(listener.pings(after_ready)) >= 4, 15)
    pings = listener.pings(after_ready)
    gaps = [b - a for a, b in itertools.pairwise(pings)]
    assert max(gaps) < 2 * PING_S, gaps
    statuses = [t for t in listener.texts() if t.startswith("STATUS=")]
    assert statuses and all(STATUS_RE.match(t) for t in statuses), statuses[-3:]

    # When SIGHUP arrives, RELOADING=1 carries the monotonic time, then READY=1 again
    before_usec = time.monotonic_ns() // 1000
    service.signal(signal.SIGHUP)
    reloading = listener.wait_for("RELOADING=1", ready + 1)
    after_usec = time.monotonic_ns() // 1000
    lines = listener.texts()[reloading].split("\n")
    assert lines[0] == "RELOADING=1"
    key, _, value = lines[1].partition("=")
    assert key == "MONOTONIC_USEC" and before_usec <= int(value) <= after_usec
    listener.wait_for("READY=1", reloading + 1)

    # When SIGTERM arrives, STOPPING=1 and a clean exit
    mark = len(listener.texts())
    assert service.stop() == 0
    listener.wait_for("STOPPING=1", mark, timeout_s=5)


def test_pings_stop_while_the_main_loop_hangs(
    make_service: MakeService, listener: NotifyListener
) -> None:
    """A main loop stuck on a journal write sends no WATCHDOG=1; pings resume once it is free."""
    service = make_service([emr()])
    start_notified(service, listener)
    wait_until(lambda: len(listener.pings()) >= 2, 15)

    # Given another process holding the journal's write lock (the service's next write blocks)
    journal = sqlite3.connect(service.root / "state" / "journal.db", isolation_level=None)
    try:
        journal.execute("BEGIN EXCLUSIVE")
        locked_at = time.monotonic()
        # Then the pings stop: none for three intervals (a ping being sent as we took the lock
        # may still arrive at once)
        wait_until(
            lambda: time.monotonic() - max(listener.pings()[-1], locked_at) > 3 * PING_S,
            10,
            message="the pings to stop",
        )
        stalled = time.monotonic()
        assert not listener.pings(locked_at + 0.5)
    finally:
        journal.execute("ROLLBACK")
        journal.close()

    # When the lock is released, the pings resume and the service is still healthy
    wait_until(lambda: listener.pings(stalled), 5, message="the pings to resume")
    wait_until(lambda: len(listener.pings(stalled)) >= 2, 5)
    assert service.process is not None and service.process.poll() is None
    assert service.stop() == 0

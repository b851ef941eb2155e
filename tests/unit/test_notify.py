"""Notifier: sd_notify datagrams reach a real AF_UNIX socket; failures never raise."""

from __future__ import annotations

import os
import socket
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from structlog.testing import capture_logs

from daemon.notify import Notifier

RECV_TIMEOUT_S = 5.0


@pytest.fixture(autouse=True)
def clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID"):
        monkeypatch.delenv(name, raising=False)


def bound_socket(address: str) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.settimeout(RECV_TIMEOUT_S)
    sock.bind(address)
    return sock


@pytest.fixture
def notify_socket(tmp_path: Path) -> Iterator[tuple[str, socket.socket]]:
    path = str(tmp_path / "notify.sock")
    with bound_socket(path) as sock:
        yield path, sock


def received(sock: socket.socket) -> str:
    return sock.recv(4096).decode()


def test_sends_each_state_message(notify_socket: tuple[str, socket.socket]) -> None:
    """READY, STATUS, WATCHDOG, RELOADING (with MONOTONIC_USEC) and STOPPING arrive as sent."""
    path, sock = notify_socket
    with Notifier(path) as notifier:
        assert notifier.ready()
        assert received(sock) == "READY=1"
        assert notifier.status("3 batches in flight")
        assert received(sock) == "STATUS=3 batches in flight"
        assert notifier.watchdog()
        assert received(sock) == "WATCHDOG=1"

        before_usec = time.monotonic_ns() // 1000
        assert notifier.reloading()
        after_usec = time.monotonic_ns() // 1000
        first, second = received(sock).split("\n")
        assert first == "RELOADING=1"
        key, value = second.split("=")
        assert key == "MONOTONIC_USEC"
        assert before_usec <= int(value) <= after_usec

        assert notifier.stopping()
        assert received(sock) == "STOPPING=1"


def test_send_takes_a_message_or_fields(notify_socket: tuple[str, socket.socket]) -> None:
    """send() passes a raw message through and renders fields as KEY=value lines."""
    path, sock = notify_socket
    with Notifier(path) as notifier:
        assert notifier.send("READY=1\nSTATUS=up")
        assert received(sock) == "READY=1\nSTATUS=up"
        assert notifier.send(EXTEND_TIMEOUT_USEC=5_000_000, STATUS="draining")
        assert received(sock) == "EXTEND_TIMEOUT_USEC=5000000\nSTATUS=draining"


def test_status_stays_one_line(notify_socket: tuple[str, socket.socket]) -> None:
    """A newline in a status text cannot inject another notify field."""
    path, sock = notify_socket
    with Notifier(path) as notifier:
        notifier.status("bad\nREADY=1")
        assert received(sock) == "STATUS=bad READY=1"


def test_reads_notify_socket_from_env(
    notify_socket: tuple[str, socket.socket], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Without an explicit path the Notifier uses $NOTIFY_SOCKET, as systemd sets it."""
    path, sock = notify_socket
    monkeypatch.setenv("NOTIFY_SOCKET", path)
    with Notifier() as notifier:
        assert notifier.is_enabled
        assert notifier.ready()
        assert received(sock) == "READY=1"


def test_abstract_socket(monkeypatch: pytest.MonkeyPatch) -> None:
    """'@name' addresses the abstract socket namespace, as systemd's own socket does."""
    name = f"medbatch-test-{uuid.uuid4().hex}"
    monkeypatch.setenv("NOTIFY_SOCKET", "@" + name)
    with bound_socket("\0" + name) as sock, Notifier() as notifier:
        assert notifier.ready()
        assert received(sock) == "READY=1"


def test_noop_without_notify_socket() -> None:
    """Outside systemd every call is a silent no-op."""
    with capture_logs() as logs, Notifier() as notifier:
        assert not notifier.is_enabled
        assert not notifier.ready()
        assert not notifier.watchdog()
        assert not notifier.send("STATUS=x")
    assert logs == []


def test_missing_socket_logs_once_and_never_raises(tmp_path: Path) -> None:
    """A socket that is gone makes sends return False with one warning, not an exception."""
    with capture_logs() as logs, Notifier(str(tmp_path / "absent.sock")) as notifier:
        assert notifier.is_enabled
        assert not notifier.ready()
        assert not notifier.watchdog()
        assert not notifier.stopping()
    assert [entry["event"] for entry in logs] == ["notify.send_failed"]
    assert logs[0]["log_level"] == "warning"


def test_logs_recovery_after_a_failure(tmp_path: Path) -> None:
    """Once the socket is back, sends succeed again and the recovery is logged."""
    path = str(tmp_path / "notify.sock")
    with capture_logs() as logs, Notifier(path) as notifier:
        assert not notifier.watchdog()
        with bound_socket(path) as sock:
            assert notifier.watchdog()
            assert received(sock) == "WATCHDOG=1"
    assert [entry["event"] for entry in logs] == ["notify.send_failed", "notify.send_recovered"]


def test_unsupported_address_is_a_noop() -> None:
    """A relative path (or a newer systemd's vsock: address) disables notify with a warning."""
    with capture_logs() as logs, Notifier("relative.sock") as notifier:
        assert not notifier.is_enabled
        assert not notifier.ready()
    assert [entry["event"] for entry in logs] == ["notify.unsupported_socket"]


def test_watchdog_interval_is_half_of_watchdog_usec(monkeypatch: pytest.MonkeyPatch) -> None:
    """WATCHDOG_USEC=10 s means a ping every 5 s; a WATCHDOG_PID of ours keeps it."""
    monkeypatch.setenv("WATCHDOG_USEC", "10000000")
    assert Notifier().watchdog_interval_s == 5.0
    monkeypatch.setenv("WATCHDOG_PID", str(os.getpid()))
    assert Notifier().watchdog_interval_s == 5.0


def test_watchdog_for_another_pid_is_not_ours(monkeypatch: pytest.MonkeyPatch) -> None:
    """A WATCHDOG_PID naming another process (a parent's watchdog) means no pings from us."""
    monkeypatch.setenv("WATCHDOG_USEC", "10000000")
    monkeypatch.setenv("WATCHDOG_PID", str(os.getpid() + 1))
    assert Notifier().watchdog_interval_s is None


@pytest.mark.parametrize("usec", [None, "", "0", "soon"])
def test_no_watchdog_interval_without_a_valid_watchdog_usec(
    usec: str | None, monkeypatch: pytest.MonkeyPatch
) -> None:
    """No, empty, zero or garbled WATCHDOG_USEC: no watchdog."""
    if usec is not None:
        monkeypatch.setenv("WATCHDOG_USEC", usec)
    assert Notifier().watchdog_interval_s is None

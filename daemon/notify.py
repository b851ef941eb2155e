"""sd_notify client: tells systemd READY, RELOADING, STOPPING, STATUS and WATCHDOG pings.

Used by the main thread only; a no-op when the service was not started with $NOTIFY_SOCKET.
"""

from __future__ import annotations

import os
import socket
import time

import structlog

log = structlog.get_logger()

# systemd reads a notification with one recv(); a blocked send must not stall the main loop
# (and with it the watchdog pings) for long.
SEND_TIMEOUT_S = 1.0


class Notifier:
    """Sends sd_notify(3) datagrams to systemd; a failed send is logged, never raised."""

    def __init__(self, socket_path: str | None = None) -> None:
        path = os.environ.get("NOTIFY_SOCKET") if socket_path is None else socket_path
        self.socket_path = path or None
        self._address = _to_address(self.socket_path)
        self._socket: socket.socket | None = None
        self._is_failing = False
        if self.socket_path and self._address is None:
            log.warning("notify.unsupported_socket", socket=self.socket_path)

    @property
    def is_enabled(self) -> bool:
        return self._address is not None

    @property
    def watchdog_interval_s(self) -> float | None:
        """Seconds between WATCHDOG=1 pings: half of $WATCHDOG_USEC; None if no watchdog is ours."""
        usec = _env_int("WATCHDOG_USEC")
        if usec is None or usec <= 0:
            return None
        if "WATCHDOG_PID" in os.environ and _env_int("WATCHDOG_PID") != os.getpid():
            return None
        return usec / 2 / 1_000_000

    def ready(self) -> bool:
        return self.send(READY=1)

    def reloading(self) -> bool:
        # MONOTONIC_USEC lets systemd (Type=notify-reload, v253+) match READY=1 to this reload.
        return self.send(RELOADING=1, MONOTONIC_USEC=time.monotonic_ns() // 1000)

    def stopping(self) -> bool:
        return self.send(STOPPING=1)

    def status(self, text: str) -> bool:
        return self.send(STATUS=text)

    def watchdog(self) -> bool:
        return self.send(WATCHDOG=1)

    def send(self, message: str | None = None, /, **fields: object) -> bool:
        """Send `message` (newline-separated KEY=value lines) and/or `fields`; True once sent."""
        if self._address is None:
            return False
        lines = [message] if message else []
        lines += [f"{key}={_one_line(value)}" for key, value in fields.items()]
        if not lines:
            return False
        try:
            self._open_socket().sendto("\n".join(lines).encode(), self._address)
        except (OSError, ValueError) as exc:
            self._on_failure(exc)
            return False
        if self._is_failing:
            self._is_failing = False
            log.info("notify.send_recovered", socket=self.socket_path)
        return True

    def close(self) -> None:
        if self._socket is not None:
            self._socket.close()
            self._socket = None

    def __enter__(self) -> Notifier:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def _open_socket(self) -> socket.socket:
        if self._socket is None:
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
            sock.settimeout(SEND_TIMEOUT_S)
            self._socket = sock
        return self._socket

    def _on_failure(self, exc: Exception) -> None:
        # Logged once per outage: the watchdog pings every few seconds and would flood the log.
        if not self._is_failing:
            self._is_failing = True
            log.warning("notify.send_failed", socket=self.socket_path, error=str(exc))


def _to_address(path: str | None) -> str | None:
    if not path:
        return None
    if path.startswith("@"):
        return "\0" + path[1:]  # abstract namespace socket
    if path.startswith("/"):
        return path
    return None


def _one_line(value: object) -> str:
    return str(value).replace("\n", " ")


def _env_int(name: str) -> int | None:
    try:
        return int(os.environ[name])
    except (KeyError, ValueError):
        return None

"""StatusServer: one loopback HTTP server thread for /metrics, /healthz, / and the result links.

Every request reads the journal on its own read-only connection and the audit log's last lines,
never the main loop's objects, so a slow request can never stall the loop.
"""

from __future__ import annotations

import http.server
import ipaddress
import os
import shutil
import socket
import sqlite3
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import ClassVar

import structlog
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from daemon.config import Settings
from daemon.liveness import assess
from daemon.metrics import Metrics, MetricsServerError, StateReading, parse_address
from daemon.web.downloads import Download, open_published, parse_download_path
from daemon.web.queries import JournalReader

log = structlog.get_logger()

# How often the serving thread looks for a shutdown request (the latency of `close`).
SHUTDOWN_POLL_S = 0.1
Response = tuple[int, str, bytes]  # status, content type, body

# Names a browser on this machine may use; anything else is refused (DNS rebinding).
_LOCAL_HOSTS = frozenset({"localhost", "127.0.0.1", "::1"})
_SECURITY_HEADERS = {
    "Content-Security-Policy": "default-src 'none'; style-src 'unsafe-inline'; img-src 'self'",
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "DENY",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-store",
}


class _Server(http.server.ThreadingHTTPServer):
    daemon_threads = True
    status: StatusServer

    def handle_error(self, request: object, client_address: object) -> None:
        """Only the error's type: socketserver's default prints a traceback to stderr, outside
        the JSON log, and an exception's text can quote a path or a value."""
        error = sys.exc_info()[1]
        log.error("http.request_failed", error=type(error).__name__)


class _Handler(http.server.BaseHTTPRequestHandler):
    server: _Server
    server_version = "medbatch"
    sys_version = ""
    protocol_version = "HTTP/1.1"

    def do_GET(self) -> None:
        self._respond(send_body=True)

    def do_HEAD(self) -> None:
        self._respond(send_body=False)

    def log_message(self, format: str, *args: object) -> None:
        """Quiet: the default writes the path to stderr, outside the JSON log."""

    def _respond(self, *, send_body: bool) -> None:
        app = self.server.status
        path = self.path.split("?", 1)[0]
        if not app.is_local_host(self.headers.get("Host")):
            self._send(421, "text/plain; charset=utf-8", b"misdirected request\n", send_body)
            return
        route = self._ROUTES.get(path)
        try:
            if route is not None:
                status, content_type, body = route(app)
                self._send(status, content_type, body, send_body)
            elif (parts := parse_download_path(path)) is not None:
                self._send_download(app, parts, send_body)
            else:
                self._send(404, "text/plain; charset=utf-8", b"not found\n", send_body)
        except sqlite3.Error as exc:
            log.warning("http.journal_unreadable", error=type(exc).__name__)
            self._send(503, "text/plain; charset=utf-8", b"journal unreadable\n", send_body)
        except (BrokenPipeError, ConnectionResetError):
            pass  # the client went away
        except Exception as exc:
            # A bug here must cost one answer, never the server thread: type only, no text.
            log.error(
                "http.request_failed",
                route=path if route is not None else "download",
                error=type(exc).__name__,
            )
            self._send(500, "text/plain; charset=utf-8", b"internal error\n", send_body)

    _ROUTES: ClassVar[dict[str, Callable[[StatusServer], Response]]] = {
        "/": lambda app: app.status_page(),
        "/healthz": lambda app: app.healthz(),
        "/metrics": lambda app: app.scrape(),
    }

    def _send(self, status: int, content_type: str, body: bytes, send_body: bool) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        for name, value in _SECURITY_HEADERS.items():
            self.send_header(name, value)
        self.end_headers()
        if send_body:
            self.wfile.write(body)

    def _send_download(
        self, app: StatusServer, parts: tuple[str, str, str], send_body: bool
    ) -> None:
        download = app.open_download(*parts)
        if download is None:
            self._send(404, "text/plain; charset=utf-8", b"not found\n", send_body)
            return
        with os.fdopen(download.fd, "rb") as file:
            self.send_response(200)
            self.send_header("Content-Type", download.content_type)
            self.send_header("Content-Length", str(download.size))
            for name, value in _SECURITY_HEADERS.items():
                self.send_header(name, value)
            self.end_headers()
            if send_body:
                shutil.copyfileobj(file, self.wfile)


class StatusServer:
    """Owns the server and its thread; `start` binds, `close` stops and joins."""

    def __init__(self, settings: Settings, metrics: Metrics) -> None:
        paths = settings.paths
        self.metrics = metrics
        self._journal = JournalReader(paths.journal)
        self._outbox = paths.outbox
        self._folders = {
            "inbox": paths.inbox,
            "state": paths.state,
            "outbox": paths.outbox,
            "quarantine": paths.quarantine,
        }
        self._pipelines = [p.name for p in settings.pipeline]
        # The page's templates (jinja2) load with the server, not with every start of the
        # service: a `run --once` or an unserved service starts sooner without them.
        from daemon.web.page import StatusPage

        self.page = StatusPage(self._journal, paths.audit, paths.outbox, self._pipelines)
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None
        self._bound_host = ""

    def start(self, address: str) -> tuple[str, int]:
        """Listen on `host:port` (`[::1]:9464` for IPv6); return the bound address."""
        host, port = parse_address(address)
        if not ipaddress.ip_address(host).is_loopback:
            log.warning("metrics.not_loopback", address=address)
        server_class = type(
            "_BoundServer",
            (_Server,),
            {"address_family": socket.AF_INET6 if ":" in host else socket.AF_INET},
        )
        try:
            self._server = server_class((host, port), _Handler)
        except OSError as exc:
            # Not a ConfigError (exit 78 stops systemd's restarts): the port may free up.
            raise MetricsServerError(
                f"metrics: cannot listen on {address}: {exc.strerror}"
            ) from None
        self._server.status = self
        self._bound_host = host
        self.metrics.watch_state(self.read_state)
        self._thread = threading.Thread(
            target=self._server.serve_forever,
            args=(SHUTDOWN_POLL_S,),
            name="status-http",
            daemon=True,
        )
        self._thread.start()
        bound_port = int(self._server.server_address[1])
        log.info("metrics.serving", host=host, port=bound_port)
        return host, bound_port

    def close(self) -> None:
        """Stop serving and wait for the thread (requests in progress finish on their own)."""
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None

    # -- what the handler asks for ------------------------------------------------------

    def status_page(self) -> Response:
        return 200, "text/html; charset=utf-8", self.page.render().encode()

    def scrape(self) -> Response:
        return 200, CONTENT_TYPE_LATEST, generate_latest(self.metrics.registry)

    def healthz(self) -> Response:
        """200 "ok" when healthy, else 503 with the reason: the rule of `medbatch status`."""
        with self._journal.open() as q:
            verdict = assess(q.meta, time.time())
        if verdict.healthy:
            return 200, "text/plain; charset=utf-8", b"ok\n"
        reason = verdict.problem or "not running (starting, stopping or no heartbeat)"
        return 503, "text/plain; charset=utf-8", f"{verdict.state}: {reason}\n".encode()

    def read_state(self) -> StateReading | None:
        """The state gauges' values, at scrape time."""
        now = time.time()
        try:
            with self._journal.open() as q:
                paused = bool(q.meta("paused"))
                oldest = q.oldest_waiting()
                last = q.last_publish()
        except sqlite3.Error as exc:
            log.warning("metrics.journal_unreadable", error=type(exc).__name__)
            return None
        return StateReading(
            is_paused=paused,
            free_bytes=self._free_bytes(),
            oldest_waiting_s={
                p: max(0.0, now - oldest[p]) if p in oldest else 0.0 for p in self._pipelines
            },
            last_publish_ts=last,
        )

    def open_download(self, pipeline: str, batch_id: str, name: str) -> Download | None:
        with self._journal.open() as q:
            folder = q.published_folder(pipeline, batch_id)
        if folder is None or Path(folder).name != batch_id:
            return None
        return open_published(self._outbox, pipeline, batch_id, name)

    def is_local_host(self, header: str | None) -> bool:
        if not header:
            return True  # HTTP/1.0 clients (Prometheus never omits it, browsers neither)
        host = header.rsplit(":", 1)[0] if not header.endswith("]") else header
        if header.startswith("["):
            host = header[1:].split("]", 1)[0]
        return host in _LOCAL_HOSTS or host == self._bound_host

    def _free_bytes(self) -> dict[str, int]:
        free = {}
        for role, folder in self._folders.items():
            try:
                st = os.statvfs(folder)
            except OSError:
                continue
            free[role] = st.f_bavail * st.f_frsize
        return free

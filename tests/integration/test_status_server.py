"""StatusServer in-process over a real journal and outbox: routes, result links, refusals."""

from __future__ import annotations

import http.client
import json
import socket
import sqlite3
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from daemon.config import load_settings
from daemon.errors import ConfigError
from daemon.journal import Journal
from daemon.metrics import Metrics, MetricsServerError
from daemon.web.server import StatusServer
from tests.support.service import render_config

BATCH = "20261130T101500Z-emr-1f2e3d4c"
UNPUBLISHED = "20261130T101600Z-emr-aaaabbbb"


@pytest.fixture
def root(tmp_path: Path) -> Path:
    (tmp_path / "medbatch.toml").write_text(
        render_config([{"name": "emr", "kind": "emr"}], {"workers": {"count": 1}})
    )
    for folder in ("inbox/emr", "state", "outbox/emr", "quarantine"):
        (tmp_path / folder).mkdir(parents=True)
    Journal(tmp_path / "state" / "journal.db").close()
    return tmp_path


@pytest.fixture
def server(root: Path) -> Iterator[tuple[StatusServer, str]]:
    settings = load_settings(root / "medbatch.toml")
    metrics = Metrics()
    metrics.file_received("emr")
    status = StatusServer(settings, metrics)
    host, port = status.start("127.0.0.1:0")
    try:
        yield status, f"http://{host}:{port}"
    finally:
        status.close()


def get(url: str, host: str | None = None) -> tuple[int, str, bytes]:
    request = urllib.request.Request(url, headers={"Host": host} if host else {})
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status, response.headers["Content-Type"], response.read()
    except urllib.error.HTTPError as error:
        return error.code, error.headers["Content-Type"], error.read()


def publish(root: Path, batch_id: str, *, state: str = "published") -> Path:
    folder = root / "outbox" / "emr" / batch_id
    folder.mkdir()
    (folder / "result.csv").write_text("diagnosis,n\nasthma,2\n")
    (folder / "manifest.json").write_text(json.dumps({"batch_id": batch_id}))
    db = sqlite3.connect(root / "state" / "journal.db")
    with db:
        db.execute(
            "INSERT INTO batches (id, pipeline, priority, state, opened_at, sealed_at, "
            "finished_at, n_files, n_bytes, folder) VALUES (?, 'emr', 3, ?, ?, ?, ?, 2, 10, ?)",
            (batch_id, state, time.time(), time.time(), time.time(), str(folder)),
        )
    db.close()
    return folder


def test_metrics_healthz_and_page_answer(server: tuple[StatusServer, str]) -> None:
    """/metrics has the registry and the state gauges; /healthz says 503 without a heartbeat;
    / is an autoescaped HTML page that refreshes itself; other paths are 404."""
    _, base = server
    status, content_type, body = get(f"{base}/metrics")
    text = body.decode()
    assert status == 200 and content_type.startswith("text/plain")
    assert 'medbatch_files_received_total{pipeline="emr"} 1.0' in text
    for gauge in ("intake_paused", "disk_free_bytes", "oldest_waiting_seconds"):
        assert f"# TYPE medbatch_{gauge} gauge" in text
    assert 'medbatch_disk_free_bytes{folder="quarantine"}' in text
    status, _, body = get(f"{base}/healthz")
    assert status == 503 and body.startswith(b"not running")
    status, content_type, body = get(f"{base}/")
    assert status == 200 and content_type == "text/html; charset=utf-8"
    assert b'http-equiv="refresh"' in body and b'data-pipeline="emr"' in body
    for path in ("/nope", "/metrics/x", "/outbox", "/healthz/"):
        assert get(base + path)[0] == 404, path


def test_result_links_serve_only_published_batch_files(
    root: Path, server: tuple[StatusServer, str]
) -> None:
    """A published batch's result.csv and manifest.json are served; traversal, hidden names,
    symlinks, unpublished batches and other folders are all 404."""
    _, base = server
    folder = publish(root, BATCH)
    publish(root, UNPUBLISHED, state="running")
    (folder / "link.csv").symlink_to(root / "state" / "journal.db")
    (root / "outbox" / "emr" / ".tmp-x").mkdir()
    status, content_type, body = get(f"{base}/outbox/emr/{BATCH}/result.csv")
    assert (status, content_type) == (200, "text/csv; charset=utf-8")
    assert body == b"diagnosis,n\nasthma,2\n"
    assert get(f"{base}/outbox/emr/{BATCH}/manifest.json")[0] == 200
    refused = [
        f"/outbox/emr/{UNPUBLISHED}/result.csv",
        f"/outbox/emr/{BATCH}/link.csv",
        f"/outbox/emr/{BATCH}/missing.csv",
        f"/outbox/emr/{BATCH}/.hidden.csv",
        f"/outbox/emr/{BATCH}/../../state/journal.db",
        f"/outbox/emr/{BATCH}/%2e%2e%2fx.csv",
        f"/outbox/_audit/{BATCH}/result.csv",
        f"/outbox/imaging/{BATCH}/result.csv",
        "/outbox/emr/.tmp-x/result.csv",
        "/outbox/emr/../../etc/passwd",
    ]
    for path in refused:
        conn = http.client.HTTPConnection(base.removeprefix("http://"), timeout=10)
        try:
            conn.request("GET", path)  # sent as is: urllib would normalise the dots away
            assert conn.getresponse().status == 404, path
        finally:
            conn.close()
    page = get(f"{base}/")[2].decode()
    assert f'href="/outbox/emr/{BATCH}/result.csv"' in page
    assert f"/outbox/emr/{UNPUBLISHED}/" not in page


@pytest.mark.parametrize("host", ["evil.example", "evil.example:80", "10.0.0.1", "[fe80::1]:1"])
def test_foreign_host_header_is_refused(server: tuple[StatusServer, str], host: str) -> None:
    """A page reached through another host name (DNS rebinding) gets nothing."""
    _, base = server
    assert get(f"{base}/", host=host)[0] == 421


@pytest.mark.parametrize("host", ["localhost", "localhost:9464", "127.0.0.1:1", "[::1]:9464"])
def test_local_host_header_is_served(server: tuple[StatusServer, str], host: str) -> None:
    _, base = server
    assert get(f"{base}/healthz", host=host)[0] == 503  # answered (not running), not refused


def test_busy_port_is_a_plain_error_not_a_config_error(root: Path) -> None:
    """An address in use may free up: not exit 78 (which stops systemd's restarts)."""
    status = StatusServer(load_settings(root / "medbatch.toml"), Metrics())
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with pytest.raises(MetricsServerError, match=f"127.0.0.1:{port}") as caught:
            status.start(f"127.0.0.1:{port}")
    assert not isinstance(caught.value, ConfigError)
    status.close()


def test_close_stops_listening(root: Path) -> None:
    status = StatusServer(load_settings(root / "medbatch.toml"), Metrics())
    host, port = status.start("127.0.0.1:0")
    status.close()
    with pytest.raises(OSError), socket.create_connection((host, port), timeout=2):
        pass


def test_a_failing_page_costs_one_answer_not_the_server(
    server: tuple[StatusServer, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A bug while rendering answers 500 without its text; the next requests are served."""
    status, base = server

    def broken() -> str:
        raise ValueError("Doe, John.csv")

    monkeypatch.setattr(status.page, "render", broken)
    code, _, body = get(f"{base}/")
    assert (code, body) == (500, b"internal error\n")
    assert get(f"{base}/healthz")[0] == 503
    conn = http.client.HTTPConnection(base.removeprefix("http://"), timeout=10)
    try:
        conn.request("HEAD", "/metrics")
        response = conn.getresponse()
        assert response.status == 200 and response.read() == b""
    finally:
        conn.close()

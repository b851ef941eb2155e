"""The service's start-up, stop and logs as a subprocess: SIGTERM at any point of start-up drains,
a failed start still closes the audit log in order, INFO logs tell each batch's story, and an
audit line rebuilt from the journal equals the live one field for field."""

from __future__ import annotations

import json
import os
import random
import signal
import socket
import sqlite3
import subprocess
from collections.abc import Callable
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest

from daemon.audit import AuditLog, read_lines
from daemon.audit.reconcile import reconcile
from daemon.journal_queries import JournalQueries
from tests.support.data import emr_csv
from tests.support.service import REPO, Service
from tests.support.waiting import wait_until
from tests.system.conftest import MakeService

CHAIN_FIELDS = {"ts", "seq", "prev", "hash", "recovered", "chain"}


def emr(name: str = "emr", **overrides: object) -> dict[str, object]:
    return {"name": name, "kind": "emr", "max_files": 3, "max_wait": 600, "settle_s": 0.1,
            **overrides}  # fmt: skip


def json_lines(text: str) -> list[dict[str, Any]]:
    out = []
    for raw in text.splitlines():
        try:
            line = json.loads(raw)
        except ValueError:
            continue
        if isinstance(line, dict):
            out.append(line)
    return out


def drop_mixed(service: Service, seed: int) -> list[str]:
    """Good tables, one without its group column (quarantined), and a pipeline of only bad
    ones (its batch fails as a whole): every kind of batch outcome reconcile rebuilds."""
    rng = random.Random(seed)
    names = []
    for i in range(5):
        names.append(service.drop("emr", f"DOE_JANE_{i}.csv", emr_csv(rng)))
    names.append(service.drop("emr", "SMITH_no_group.csv", b"patient_id,age\n1,50\n"))
    for i in range(2):
        names.append(service.drop("bad", f"ROE_{i}.csv", b"patient_id,age\n2,60\n"))
    return names


def test_rebuilt_audit_lines_equal_the_live_ones(make_service: MakeService) -> None:
    """For every transition the journal records, the line rebuilt from it equals the line the
    service wrote live, field for field (but the chain fields and the `recovered` mark)."""
    # Given a run that published, quarantined single inputs and failed a whole batch
    service = make_service([emr(), emr("bad")])
    drop_mixed(service, 3)
    done = service.run("run", "--once")
    assert done.returncode == 0, done.stderr
    live = list(read_lines(service.outbox / "_audit"))

    # When every line is rebuilt from the journal into an empty log
    rebuilt_folder = service.root / "rebuilt"
    journal = JournalQueries.open_readonly(service.root / "state" / "journal.db")
    try:
        # Configured as the service's: both pipelines hash names (the default) with its key.
        name_key = (service.root / "state" / "audit-name.key").read_bytes()
        hashed = frozenset({"emr", "bad"})
        with AuditLog(rebuilt_folder, hashed_pipelines=hashed, name_key=name_key) as audit:
            count = reconcile(journal, audit, rebuilt_folder, 0.0)
    finally:
        journal.close()
    rebuilt = list(read_lines(rebuilt_folder))

    # Then each rebuilt line has a live twin with exactly the same payload
    assert count == len(rebuilt) > 0
    events = {line["event"] for line in rebuilt}
    assert {"file.received", "file.quarantined", "batch.sealed", "batch.published"} <= events
    assert "batch.failed" in events

    def key(line: dict[str, Any]) -> tuple[Any, ...]:
        is_file = str(line["event"]).startswith("file.")
        return line["event"], line.get("file_id") if is_file else line.get("batch_id")

    live_by_key = {key(line): line for line in live}
    for line in rebuilt:
        assert line["recovered"] is True
        twin = live_by_key[key(line)]
        payload = {k: v for k, v in line.items() if k not in CHAIN_FIELDS}
        assert payload == {k: v for k, v in twin.items() if k not in CHAIN_FIELDS}


def test_info_logs_tell_each_batch_without_a_name(make_service: MakeService) -> None:
    """At INFO: the start-up line (version, config, pipelines, workers) and one line per batch
    sealed and published or failed, with ids and counts; never a file name."""
    service = make_service([emr(), emr("bad")])
    names = drop_mixed(service, 5)
    done = service.run("run", "--once")
    assert done.returncode == 0, done.stderr
    logs = json_lines(done.stderr)

    starting = next(line for line in logs if line["event"] == "daemon.starting")
    assert starting["config"] == str(service.config)
    assert starting["pipelines"] == ["emr", "bad"] and starting["workers"] == 2
    assert starting["version"]
    sealed = [line for line in logs if line["event"] == "batch.sealed"]
    published = [line for line in logs if line["event"] == "batch.published"]
    failed = [line for line in logs if line["event"] == "batch.quarantined"]
    assert sum(line["files"] for line in sealed) == len(names)
    assert all(line["level"] == "info" for line in sealed + published)
    assert {line["batch_id"] for line in published + failed} == {s["batch_id"] for s in sealed}
    assert all(isinstance(line["run_s"], float) for line in published)
    assert failed and failed[0]["reasons"]
    for name in names:
        stem = Path(name).stem
        assert stem not in done.stderr, f"{stem} leaked into the logs"


def _holds_sigterm(pid: int) -> bool:
    """SIGTERM blocked or caught: the process owns it (no longer the kernel's default)."""
    bit = 1 << (signal.SIGTERM - 1)
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(("SigBlk:", "SigCgt:")) and int(line.split()[1], 16) & bit:
            return True
    return False


def _after_spawn(service: Service) -> None:
    """The earliest moment any program can own SIGTERM: `medbatch run`'s first statements
    (until then the interpreter is still starting and the kernel's default applies)."""
    assert service.process is not None
    pid = service.process.pid
    wait_until(lambda: _holds_sigterm(pid), 30, 0.001, message="SIGTERM held")


def _after_starting_line(service: Service) -> None:
    wait_until(
        lambda: any(line.get("event") == "daemon.starting" for line in service.logs()),
        30,
        0.005,
    )


def _after_pool_start(service: Service) -> None:
    wait_until(service.worker_pids, 30, 0.01, message="worker processes")


def _after_ready(service: Service) -> None:
    wait_until(service.is_ready, 60)


@pytest.mark.parametrize(
    "moment", [_after_spawn, _after_starting_line, _after_pool_start, _after_ready]
)
def test_sigterm_at_any_moment_of_start_up_stops_cleanly(
    make_service: MakeService, moment: Callable[[Service], None]
) -> None:
    """SIGTERM during start-up (handlers are installed first) stops with exit 0, no worker left
    behind, the audit chain intact; what was in the inbox is taken by the next start."""
    service = make_service([emr()])
    rng = random.Random(9)
    for i in range(30):
        service.drop("emr", f"v{i}.csv", emr_csv(rng, rows=5))
    process = service.start(wait_ready=False)
    moment(service)
    process.send_signal(signal.SIGTERM)
    assert process.wait(timeout=90) == 0, service.stderr()
    wait_until(lambda: not service.worker_pids(), 30, message="workers gone")
    assert service.run("audit", "verify").returncode == 0
    audit = service.audit()
    assert audit[0]["event"] == "daemon.started"
    assert audit[-1]["event"] == "daemon.stopped"
    assert "reason" not in audit[-1]


def test_a_start_that_fails_still_stops_in_order(make_service: MakeService) -> None:
    """The executor cannot start (no Dask scheduler listens there): the start fails with exit
    1, yet daemon.stopped closes the log (reason start_failed) and the chain verifies."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]  # closed again below: nothing listens there
    workers = {"count": 1, "executor": "dask", "scheduler_address": f"tcp://127.0.0.1:{port}"}
    service = make_service([emr()], workers=workers)
    env = {**os.environ, "DASK_DISTRIBUTED__COMM__TIMEOUTS__CONNECT": "1s"}
    done = subprocess.run(
        service.command("run"), cwd=REPO, env=env, capture_output=True, text=True, timeout=120,
        check=False,
    )  # fmt: skip
    assert done.returncode == 1, done.stderr
    audit = service.audit()
    assert audit[0]["event"] == "daemon.started"
    assert audit[-1]["event"] == "daemon.stopped"
    assert audit[-1]["reason"] == "start_failed"
    assert service.run("audit", "verify").returncode == 0


def test_lines_lost_after_the_recorded_head_are_rebuilt_at_start(
    make_service: MakeService,
) -> None:
    """A crash loses the log's tail after the journal's recorded head: the next start rebuilds
    exactly the lost transitions' lines, each equal to the lost one but for the chain fields."""
    # Given a finished run whose log we cut after the first batch was sealed, as if the disk
    # lost the rest, with the journal's head recorded at that point
    service = make_service([emr(), emr("bad")])
    drop_mixed(service, 7)
    assert service.run("run", "--once").returncode == 0
    folder = service.outbox / "_audit"
    (path,) = sorted(folder.glob("audit-*.jsonl"))
    raw = path.read_bytes().splitlines(keepends=True)
    cut = next(i for i, line in enumerate(raw) if json.loads(line)["event"] == "batch.sealed")
    kept, lost = raw[: cut + 1], [json.loads(line) for line in raw[cut + 1 :]]
    path.write_bytes(b"".join(kept))
    head = json.loads(kept[-1])
    at = datetime.fromisoformat(head["ts"]).timestamp()
    db = sqlite3.connect(service.root / "state" / "journal.db")
    with db:
        db.execute(
            "UPDATE meta SET value=? WHERE key='audit_head'",
            (json.dumps([head["seq"], head["hash"]]),),
        )
        db.execute("UPDATE meta SET value=? WHERE key='audit_head_at'", (json.dumps(at),))
    db.close()

    # When the service starts again (nothing new to take)
    assert service.run("run", "--once").returncode == 0

    # Then every lost transition line is back, marked recovered, payload unchanged
    assert service.run("audit", "verify").returncode == 0
    rebuilt = [line for line in read_lines(folder) if line.get("recovered")]
    transitions = {"file.received", "file.quarantined", "batch.sealed", "batch.started",
                   "batch.published", "batch.failed"}  # fmt: skip
    expected = [line for line in lost if line["event"] in transitions]
    assert expected, "the cut lost no transition"

    def payload(line: dict[str, Any]) -> dict[str, Any]:
        return {k: v for k, v in line.items() if k not in CHAIN_FIELDS}

    assert sorted(map(json.dumps, map(payload, rebuilt))) == sorted(
        map(json.dumps, map(payload, expected))
    )

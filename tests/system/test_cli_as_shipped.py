"""The command line as it ships: one instance per state folder, start-up signals, failures
before anything is touched, broken pipes and a journal the caller may not read."""

from __future__ import annotations

import os
import random
import signal
import socket
import subprocess
from pathlib import Path

import pytest

from tests.support.data import emr_csv
from tests.support.service import REPO, Service
from tests.support.users import interpreter_paths, reachable, run_as_unprivileged
from tests.support.waiting import wait_until
from tests.system.conftest import MakeService

EMR = {"name": "emr", "kind": "emr", "max_files": 1, "max_wait": 60, "settle_s": 0.1}


def test_a_second_instance_is_refused_and_the_audit_chain_stays_intact(
    make_service: MakeService,
) -> None:
    """`run --once` and a second `run` beside a running service exit 75 naming its pid; the
    audit log the first one writes verifies afterwards."""
    service = make_service([EMR])
    first = service.start()
    for args in (("run", "--once"), ("run",)):
        second = service.run(*args, timeout_s=60)
        assert second.returncode == 75, second.stderr
        assert f"pid {first.pid}" in second.stderr
    service.drop("emr", "a.csv", emr_csv(random.Random(7), rows=12))
    wait_until(lambda: service.manifests("emr"), 30, message="a published batch")
    assert service.stop() == 0
    verified = service.run("audit", "verify")
    assert verified.returncode == 0, verified.stdout
    assert [line["event"] for line in service.audit()].count("daemon.started") == 1


def _blocks_or_catches_sigterm(pid: int) -> bool:
    fields = dict(
        line.split(":", 1) for line in Path(f"/proc/{pid}/status").read_text().splitlines()
    )
    bit = 1 << (signal.SIGTERM - 1)
    return bool((int(fields["SigBlk"], 16) | int(fields["SigCgt"], 16)) & bit)


def test_sigterm_during_start_up_stops_cleanly(make_service: MakeService) -> None:
    """From the moment `run` parses its arguments, a SIGTERM (during the imports, recovery, pool
    start or the start-up scan) drains and exits 0 instead of killing the process."""
    service = make_service([EMR])
    for i in range(20):
        service.drop("emr", f"backlog-{i}.csv", emr_csv(random.Random(7), rows=12))
    process = service.start(wait_ready=False)
    wait_until(lambda: _blocks_or_catches_sigterm(process.pid), 30, interval_s=0.001)
    process.send_signal(signal.SIGTERM)
    assert process.wait(timeout=60) == 0, service.stderr()
    assert service.run("audit", "verify").returncode == 0
    events = [line["event"] for line in service.audit()]
    assert events[-1] == "daemon.stopped", events


def test_a_taken_metrics_port_fails_before_anything_is_touched(make_service: MakeService) -> None:
    """Exit 78 naming the key, with no journal, spool or audit line written."""
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        service = make_service([EMR], service={"metrics_address": f"127.0.0.1:{port}"})
        done = service.run("run", timeout_s=60)
    assert done.returncode == 78, done.stderr
    assert "service.metrics_address" in done.stderr
    assert not (service.root / "state" / "journal.db").exists()
    assert not (service.outbox / "_audit").exists()


def test_status_into_a_closed_pipe_says_nothing_and_exits_141(make_service: MakeService) -> None:
    """`medbatch status | head` with the reader gone: no crash log, the shell's SIGPIPE status."""
    service = make_service([EMR])
    assert service.run("run", "--once").returncode == 0
    read_end, write_end = os.pipe()
    os.close(read_end)
    try:
        done = subprocess.run(
            service.command("status"),
            cwd=REPO,
            stdout=write_end,
            stderr=subprocess.PIPE,
            text=True,
            timeout=60,
            check=False,
        )
    finally:
        os.close(write_end)
    assert done.returncode == 141
    assert "crashed" not in done.stderr and "Traceback" not in done.stderr, done.stderr


@pytest.mark.xdist_group("service-user")  # see tests/security/test_intake_owners.py
def test_a_journal_the_caller_cannot_read_gets_one_clear_line(make_service: MakeService) -> None:
    """A group member without access to the 0600 journal gets exit 77 and what to do, not a
    PermissionError crash."""
    service: Service = make_service([EMR])
    assert service.run("run", "--once").returncode == 0
    service.config.chmod(0o644)
    with reachable([*interpreter_paths(), REPO, service.config]):
        for args in (("status",), ("trace", "x.csv"), ("audit", "verify")):
            done = subprocess.run(
                service.command(*args),
                cwd=REPO,
                capture_output=True,
                text=True,
                timeout=60,
                check=False,
                **run_as_unprivileged(),  # type: ignore[arg-type]
                env={**os.environ, "PYTHONDONTWRITEBYTECODE": "1"},
            )
            if done.returncode != 77:  # the whole of stderr: an assertion's repr is cut short
                pytest.fail(f"{args} exited {done.returncode}: {done.stderr}", pytrace=False)
            assert done.stderr.count("\n") == 1, done.stderr
            assert "cannot read the journal" in done.stderr
            assert "sudo -u medbatch" in done.stderr


def test_trace_points_at_the_real_quarantined_copy(make_service: MakeService) -> None:
    """A quarantined name made safe (a control byte) or numbered (a second `bad.csv`) is traced
    to the copy that is really there, found through the journal, not re-derived."""
    service = make_service([{**EMR, "max_files": 10, "max_wait": 0.5}])
    service.drop("emr", "bad.csv", b"\x00not a table")
    service.drop("emr", "tab\there.csv", b"\x00not a table either")
    assert service.run("run", "--once").returncode == 0
    service.drop("emr", "bad.csv", b"\x00again, other bytes")
    assert service.run("run", "--once").returncode == 0
    for key, n in (("bad.csv", 2), ("tab\there.csv", 1)):
        done = service.run("trace", key)
        assert done.returncode == 0, done.stdout + done.stderr
        copies = [line for line in done.stdout.splitlines() if "quarantined copy" in line]
        assert len(set(copies)) == n and all("(not there" not in c for c in copies), done.stdout


@pytest.mark.parametrize("kind", ["symlink", "fifo", "folder"])
def test_run_once_says_what_it_left_in_the_inbox_and_exits_1(
    make_service: MakeService, kind: str
) -> None:
    """An entry intake cannot take stays in the inbox: `run --once` still publishes the rest,
    then exits 1 and says how many it left, so a cron job notices."""
    service = make_service([EMR])
    service.drop("emr", "good.csv", emr_csv(random.Random(3), rows=12))
    stuck = service.inbox / "emr" / "stuck.csv"
    {"symlink": lambda: stuck.symlink_to("/etc/passwd"), "fifo": lambda: os.mkfifo(stuck),
     "folder": stuck.mkdir}[kind]()  # fmt: skip

    done = service.run("run", "--once", timeout_s=60)

    assert done.returncode == 1, done.stderr
    assert "1 left in the inbox" in done.stdout and "0 unfinished" in done.stdout
    assert len(service.manifests("emr")) == 1
    assert os.path.lexists(stuck)

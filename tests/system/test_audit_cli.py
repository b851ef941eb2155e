"""`medbatch audit verify` and `medbatch trace` on the log of a real run, then tampered with."""

from __future__ import annotations

import hashlib
import json
import random
import re
import shutil
import subprocess
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from daemon.audit import AuditEvent, AuditLog, hash_name
from daemon.audit.verify import canonical
from tests.support.data import emr_csv
from tests.support.service import Service
from tests.support.waiting import wait_until
from tests.system.conftest import MakeService

SECRET_NAMES = [f"DOE_JANE_MRN{100200 + i}.csv" for i in range(6)]
LAB_NAMES = ["labs-a.csv", "labs-b.csv"]


def pipelines() -> list[dict[str, Any]]:
    common = {"kind": "emr", "max_files": 3, "max_wait": 600, "settle_s": 0.1}
    return [
        {"name": "emr", "hash_names": True, **common},
        {"name": "labs", "hash_names": False, **{**common, "max_files": 2}},
    ]


@pytest.fixture(scope="module")
def pristine(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """One real run, stopped cleanly: yesterday's log (from an earlier run) chained to today's.

    Yesterday's lines are written by AuditLog itself with its clock set a day back; the service
    then goes on from that chain into today's file, as it does at midnight.
    """
    root = tmp_path_factory.mktemp("pristine")
    yesterday = datetime.now(UTC) - timedelta(days=1)
    with AuditLog(root / "outbox" / "_audit", clock=yesterday.timestamp) as old:
        old.append(AuditEvent.DAEMON_STARTED, pid=1, version="earlier")
        old.append(AuditEvent.DAEMON_STOPPED, pid=1)
    service = Service(root, pipelines())
    try:
        rng = random.Random(21)
        (service.inbox / "emr").mkdir(parents=True)
        (service.inbox / "emr" / "DOE_JOHN_link.csv").symlink_to(root / "medbatch.toml")
        service.start()
        for name in SECRET_NAMES:
            service.drop("emr", name, emr_csv(rng))
        for name in LAB_NAMES:
            service.drop("labs", name, emr_csv(rng))
        wait_until(lambda: service.accounted() == len(SECRET_NAMES) + len(LAB_NAMES), 60)
        assert service.stop() == 0
    finally:
        service.kill_all()
    yield root


@pytest.fixture
def copy(pristine: Path, tmp_path: Path) -> Service:
    """A private copy of the pristine run to tamper with (relative paths: it just works)."""
    root = tmp_path / "run"
    shutil.copytree(pristine, root, symlinks=True)
    service = Service.__new__(Service)
    service.root, service.config, service.process, service.runs = (
        root,
        root / "medbatch.toml",
        None,
        0,
    )
    service.raw_names = {"labs"}
    return service


def verify(service: Service) -> subprocess.CompletedProcess[str]:
    return service.run("audit", "verify", timeout_s=60)


def today_file(service: Service) -> Path:
    return max((service.outbox / "_audit").glob("audit-*.jsonl"))


def lines_of(path: Path) -> list[bytes]:
    return path.read_bytes().splitlines(keepends=True)


def test_untouched_log_verifies(copy: Service) -> None:
    """The log of a clean run, over two days' files, verifies up to the journal's head."""
    done = verify(copy)
    assert done.returncode == 0, done.stdout + done.stderr
    files = sorted(p.name for p in (copy.outbox / "_audit").glob("audit-*.jsonl"))
    assert len(files) == 2
    total = sum(len(lines_of(copy.outbox / "_audit" / f)) for f in files)
    assert f"audit log intact: {total} lines in 2 files" in done.stdout
    assert f"reaches the journal's head, seq {total}" in done.stdout


def test_deleted_middle_line_is_named(copy: Service) -> None:
    """Removing a line in the middle: exit 1 naming the file and line of the gap."""
    path = today_file(copy)
    lines = lines_of(path)
    del lines[4]
    path.write_bytes(b"".join(lines))
    done = verify(copy)
    seq = json.loads(lines[4])["seq"]
    assert done.returncode == 1
    assert f"{path.name} line 5: seq {seq} expected {seq - 1}" in done.stdout


def test_edited_field_is_named(copy: Service) -> None:
    """Changing one fact of one line (a publication's file count): exit 1, hash mismatch there."""
    path = today_file(copy)
    lines = lines_of(path)
    index = next(i for i, raw in enumerate(lines) if b'"batch.published"' in raw)
    lines[index] = re.sub(rb'"files":(\d+)', rb'"files":99', lines[index])
    path.write_bytes(b"".join(lines))
    done = verify(copy)
    assert done.returncode == 1
    assert f"{path.name} line {index + 1}: hash mismatch (line altered)" in done.stdout


def test_swapped_lines_are_named(copy: Service) -> None:
    """Exchanging two neighbouring lines: exit 1 at the first of them."""
    path = today_file(copy)
    lines = lines_of(path)
    lines[6], lines[7] = lines[7], lines[6]
    path.write_bytes(b"".join(lines))
    done = verify(copy)
    assert done.returncode == 1
    assert re.search(rf"{re.escape(path.name)} line 7: seq \d+ expected \d+", done.stdout)


def test_truncated_tail_is_caught_by_the_journal_head(copy: Service) -> None:
    """Cutting off the last line (daemon.stopped): the chain alone is fine, the journal's head
    recorded at the stop is not reached."""
    path = today_file(copy)
    lines = lines_of(path)
    last = json.loads(lines[-1])
    assert last["event"] == "daemon.stopped"
    path.write_bytes(b"".join(lines[:-1]))
    done = verify(copy)
    assert done.returncode == 1, done.stdout
    assert (
        f"{path.name}: log ends at seq {last['seq'] - 1} but the journal records seq {last['seq']}"
        in done.stdout
    )


def test_spliced_days_are_named(copy: Service) -> None:
    """Today's lines appended to yesterday's file (today's removed): the first moved line's date
    does not match its file."""
    first, second = sorted((copy.outbox / "_audit").glob("audit-*.jsonl"))
    kept = len(lines_of(first))
    first.write_bytes(first.read_bytes() + second.read_bytes())
    second.unlink()
    done = verify(copy)
    assert done.returncode == 1
    assert f"{first.name} line {kept + 1}: date of ts does not match file name" in done.stdout


def test_untouched_log_after_kill_9_verifies(make_service: MakeService) -> None:
    """A service killed with SIGKILL mid-run leaves a log that verifies (the journal's head may
    lag behind it); a torn last line is tolerated and said."""
    service = make_service(pipelines())
    service.start()
    rng = random.Random(22)
    for i in range(9):
        service.drop("emr", f"k{i}.csv", emr_csv(rng, rows=2000))
    wait_until(lambda: any(a["event"] == "batch.started" for a in service.audit()), 30)
    service.kill()

    done = verify(service)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "audit log intact" in done.stdout

    with today_file(service).open("ab") as log:
        log.write(b'{"event":"batch.publ')
    done = verify(service)
    assert done.returncode == 0, done.stdout
    assert "torn by a crash: tolerated" in done.stdout


def test_hashed_names_never_reach_the_log(copy: Service) -> None:
    """In a hash_names pipeline (the default) no file name appears in any audit line; in one
    with `hash_names = false` they do."""
    raw = b"".join(p.read_bytes() for p in (copy.outbox / "_audit").glob("audit-*.jsonl"))
    assert b"DOE_" not in raw
    key = (copy.root / "state" / "audit-name.key").read_bytes()
    files = {a.get("published_name") for a in copy.audit() if a.get("pipeline") == "emr"}
    assert {hash_name(key, n) for n in [*SECRET_NAMES, "DOE_JOHN_link.csv"]} <= files
    assert {a.get("file") for a in copy.audit() if a.get("pipeline") == "labs"} >= set(LAB_NAMES)


@pytest.mark.parametrize("by", ["name", "sha256", "hashed name"])
def test_trace_shows_an_input_from_arrival_to_archive(copy: Service, by: str) -> None:
    """trace by name (hashed in the log), by sha256 or by the hashed name: the input's events,
    its batch's result folder and its archived copy."""
    name = SECRET_NAMES[2]
    (sha,) = copy.journal("SELECT sha256 FROM files WHERE name=?", name)[0]
    if by == "hashed name":
        key = hash_name((copy.root / "state" / "audit-name.key").read_bytes(), name)
    else:
        key = {"name": name, "sha256": sha}[by]
    done = copy.run("trace", key)
    assert done.returncode == 0, done.stdout + done.stderr
    out = done.stdout
    assert f"{name} in pipeline emr" in out and f"sha256 {sha}" in out
    events = re.findall(r"^  \S+Z (\S+)", out, re.MULTILINE)
    assert events[:4] == ["file.received", "batch.sealed", "batch.started", "batch.published"]
    (batch_id,) = copy.journal("SELECT batch_id FROM files WHERE name=?", name)[0]
    result = copy.outbox / "emr" / batch_id
    assert f"result {result}\n" in out
    archived = re.search(r"archived copy (\S+)\n", out)
    assert archived is not None and Path(archived[1]).read_bytes().startswith(b"patient_id,")


def test_trace_of_a_refused_entry_and_of_unknowns(copy: Service) -> None:
    """A symlink refused at the inbox is traced by its name (hashed in the log); an unknown
    name or sha256 exits 1."""
    done = copy.run("trace", "DOE_JOHN_link.csv")
    assert done.returncode == 0, done.stdout + done.stderr
    assert "refused (symlink)" in done.stdout and "file.rejected" in done.stdout
    for key in ("nobody.csv", "0" * 64):
        done = copy.run("trace", key)
        assert (done.returncode, done.stdout.strip()) == (1, f"unknown input: {key}")


def test_trace_on_a_damaged_log_shows_what_it_can(copy: Service) -> None:
    """A garbled audit line does not crash trace: the journal's facts and the events before
    the damage are shown, with a note to run `audit verify`."""
    path = today_file(copy)
    lines = lines_of(path)
    lines[-3] = b"garbage\n"
    path.write_bytes(b"".join(lines))
    done = copy.run("trace", LAB_NAMES[0])
    assert done.returncode == 0, done.stderr
    assert f"{LAB_NAMES[0]} in pipeline labs" in done.stdout and "file.received" in done.stdout
    assert "audit log unreadable" in done.stderr and "medbatch audit verify" in done.stderr


def test_service_lines_are_keyed_after_the_unkeyed_history(copy: Service) -> None:
    """Yesterday's lines (written before keys) are unkeyed; the service's own are HMAC-chained
    with a 0600 key in the state folder, and verify reads across the switch."""
    files = sorted((copy.outbox / "_audit").glob("audit-*.jsonl"))
    old, new = ([json.loads(raw) for raw in lines_of(f)] for f in files)
    assert not any("chain" in line for line in old)
    assert {line.get("chain") for line in new} == {"hmac-sha256"}
    assert ((copy.root / "state" / "audit-chain.key").stat().st_mode & 0o777) == 0o600
    done = verify(copy)
    assert done.returncode == 0 and "2 older lines chained without a key" in done.stdout


def forged_after(last: bytes, digest: str, **fields: Any) -> bytes:
    """A line appended by someone who can write the folder but not read the chain key."""
    prev = json.loads(last)
    line = {"ts": prev["ts"], "seq": prev["seq"] + 1, "event": "file.published", **fields}
    line["prev"] = prev["hash"]
    data = (prev["hash"] + canonical(line)).encode("ascii")
    line["hash"] = hashlib.sha256(data).hexdigest() if digest == "sha256" else digest
    return (canonical(line) + "\n").encode("ascii")


@pytest.mark.parametrize(
    ("fields", "why"),
    [
        ({}, "unkeyed line after the keyed chain began (forged)"),
        ({"chain": "hmac-sha256"}, "hash mismatch (line altered)"),
    ],
    ids=["unmarked", "marked"],
)
def test_line_appended_without_the_key_is_named(
    copy: Service, fields: dict[str, Any], why: str
) -> None:
    """Appending a correctly re-chained (plain SHA-256) line: exit 1, naming that line."""
    path = today_file(copy)
    lines = lines_of(path)
    path.write_bytes(b"".join([*lines, forged_after(lines[-1], "sha256", file="x.csv", **fields)]))
    done = verify(copy)
    assert done.returncode == 1
    assert f"{path.name} line {len(lines) + 1}: {why}" in done.stdout


def test_chain_head_is_logged_for_journald(copy: Service) -> None:
    """`audit.head` (seq and hash) reaches the log, so a copy of the head exists off the folder;
    the last one logged (at the stop) is the journal's head."""
    heads = [
        json.loads(line)
        for log in sorted(copy.root.glob("stderr-*.log"))
        for line in log.read_text().splitlines()
        if '"audit.head"' in line
    ]
    assert heads, "no audit.head log line"
    last = json.loads(lines_of(today_file(copy))[-1])
    assert (heads[-1]["seq"], heads[-1]["hash"]) == (last["seq"], last["hash"])

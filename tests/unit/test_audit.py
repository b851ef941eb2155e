"""Unit tests of the hash-chained audit log: writer, recovery and verifier, on real files."""

from __future__ import annotations

import errno
import hashlib
import hmac
import json
import os
import subprocess
import sys
from datetime import UTC, datetime
from pathlib import Path

import pytest

from daemon.audit import (
    AuditEvent,
    AuditLog,
    AuditLogCorruptError,
    NameKeyError,
    hash_name,
    load_name_key,
    read_lines,
    read_name_key,
    verify,
)
from daemon.audit.events import BatchSealed, FileReceived, Record
from daemon.audit.verify import GENESIS_HASH

ROOT = Path(__file__).resolve().parents[2]
DAY1, DAY2, DAY3 = "2025-11-29", "2025-11-30", "2025-12-01"


class Clock:
    def __init__(self, iso: str) -> None:
        self.now = datetime.fromisoformat(iso).replace(tzinfo=UTC).timestamp()

    def __call__(self) -> float:
        return self.now

    def set(self, iso: str) -> None:
        self.now = datetime.fromisoformat(iso).replace(tzinfo=UTC).timestamp()


def day_file(folder: Path, day: str) -> Path:
    return folder / f"audit-{day}.jsonl"


def write_log(folder: Path, count: int, clock: Clock | None = None) -> tuple[int, str]:
    with AuditLog(folder, clock=clock or Clock(f"{DAY1}T10:00:00")) as log:
        for i in range(count):
            log.append(AuditEvent.FILE_RECEIVED, pipeline="emr", file=f"f{i}.csv")
        return log.head


def write_three_days(folder: Path) -> None:
    clock = Clock(f"{DAY1}T10:00:00")
    with AuditLog(folder, clock=clock) as log:
        for day in (DAY1, DAY2, DAY3):
            clock.set(f"{day}T10:00:00")
            for i in range(4):
                log.append(AuditEvent.FILE_RECEIVED, file=f"{day}-{i}.csv")


def lines_of(path: Path) -> list[bytes]:
    return path.read_bytes().splitlines(keepends=True)


def rehash(raw: bytes) -> bytes:
    line = json.loads(raw)
    del line["hash"]
    body = json.dumps(line, sort_keys=True, separators=(",", ":"), ensure_ascii=True)
    digest = hashlib.sha256((line["prev"] + body).encode("ascii")).hexdigest()
    return f'{body[:-1]},"hash":"{digest}"}}\n'.encode()


@pytest.fixture
def log10(tmp_path: Path) -> tuple[Path, tuple[int, str]]:
    folder = tmp_path / "_audit"
    return folder, write_log(folder, 10)


def test_empty_log_starts_at_genesis(tmp_path: Path) -> None:
    """A new folder is created, the head is (0, genesis) and verify accepts it."""
    folder = tmp_path / "outbox" / "_audit"
    log = AuditLog(folder)
    assert log.head == (0, GENESIS_HASH)
    log.close()
    assert folder.is_dir()
    assert verify(folder) == verify(folder, expected_head=(0, GENESIS_HASH))
    assert verify(folder).ok and verify(folder).lines == 0


def test_line_format_and_hash(tmp_path: Path) -> None:
    """A line is the canonical JSON (sorted keys, no spaces) of ts, seq, event, fields and prev,
    the text its sha256 hash covers, with that hash added last."""
    with AuditLog(tmp_path, clock=Clock(f"{DAY1}T10:00:00.123456")) as log:
        returned = log.append(AuditEvent.BATCH_SEALED, batch_id="b1", reason=None, files=3)
    raw = day_file(tmp_path, DAY1).read_bytes()
    line = json.loads(raw)
    assert line == returned
    assert list(returned) == ["ts", "seq", "event", "batch_id", "files", "prev", "hash"]
    assert line["ts"] == f"{DAY1}T10:00:00.123Z"
    assert (line["seq"], line["event"], line["prev"]) == (1, "batch.sealed", GENESIS_HASH)
    assert rehash(raw) == raw


def test_many_appends_verify(tmp_path: Path) -> None:
    """Two thousand appends form one chain that verifies and matches the head."""
    head = write_log(tmp_path, 2000)
    report = verify(tmp_path, expected_head=head)
    assert (report.ok, report.lines, report.files, report.error) == (True, 2000, 1, None)
    assert head[0] == 2000


def test_reopen_continues_seq_and_chain(tmp_path: Path) -> None:
    """After a restart seq goes on from the last line and the chain still verifies."""
    first_head = write_log(tmp_path, 5)
    with AuditLog(tmp_path, clock=Clock(f"{DAY1}T11:00:00")) as log:
        assert log.head == first_head
        line = log.append(AuditEvent.DAEMON_STARTED)
    assert (line["seq"], line["prev"]) == (6, first_head[1])
    assert [item["seq"] for item in read_lines(tmp_path)] == list(range(1, 7))
    assert verify(tmp_path, expected_head=(6, str(line["hash"]))).ok


def test_rollover_to_next_day_chains_across_files(tmp_path: Path) -> None:
    """A line after UTC midnight opens the next day's file, chained to the day before."""
    clock = Clock(f"{DAY1}T23:59:59.999")
    with AuditLog(tmp_path, clock=clock) as log:
        last_of_day1 = log.append(AuditEvent.FILE_RECEIVED, file="a")
        clock.set(f"{DAY2}T00:00:00")
        first_of_day2 = log.append(AuditEvent.FILE_RECEIVED, file="b")
    assert first_of_day2["prev"] == last_of_day1["hash"]
    assert len(lines_of(day_file(tmp_path, DAY1))) == 1
    assert len(lines_of(day_file(tmp_path, DAY2))) == 1
    report = verify(tmp_path)
    assert (report.ok, report.lines, report.files) == (True, 2, 2)


def test_clock_stepping_back_keeps_order(tmp_path: Path) -> None:
    """A wall clock stepped back across midnight neither reorders ts nor writes to an older file."""
    clock = Clock(f"{DAY2}T00:00:01")
    with AuditLog(tmp_path, clock=clock) as log:
        first = log.append(AuditEvent.DAEMON_STARTED)
        clock.set(f"{DAY1}T23:59:58")
        second = log.append(AuditEvent.FILE_RECEIVED, file="a")
    assert second["ts"] == first["ts"]
    assert not day_file(tmp_path, DAY1).exists()
    assert verify(tmp_path).ok


def test_files_and_folder_modes(tmp_path: Path) -> None:
    """The folder is created 0o750 and day files 0o640 (less what the umask removes)."""
    umask = os.umask(0)
    os.umask(umask)
    folder = tmp_path / "_audit"
    write_log(folder, 1)
    assert folder.stat().st_mode & 0o777 == 0o750 & ~umask
    assert day_file(folder, DAY1).stat().st_mode & 0o777 == 0o640 & ~umask


def test_reserved_fields_and_unknown_events_are_refused(tmp_path: Path) -> None:
    """Fields named like chain keys and events outside the vocabulary raise ValueError."""
    with AuditLog(tmp_path) as log:
        with pytest.raises(ValueError, match="seq"):
            log.append(AuditEvent.FILE_RECEIVED, seq=3)
        with pytest.raises(ValueError):
            log.append("file.eaten")  # type: ignore[arg-type]
        assert log.head == (0, GENESIS_HASH)


def test_torn_tail_is_tolerated_and_reported(log10: tuple[Path, tuple[int, str]]) -> None:
    """An unterminated last line of the last file verifies ok with torn_tail and is not read."""
    folder, head = log10
    with day_file(folder, DAY1).open("ab") as file:
        file.write(b'{"event":"file.rec')
    report = verify(folder, expected_head=head)
    assert (report.ok, report.torn_tail, report.lines) == (True, True, 10)
    assert len(list(read_lines(folder))) == 10


def test_torn_line_before_the_last_file_is_an_error(tmp_path: Path) -> None:
    """An unterminated line in a file that is not the last one is an error naming that line."""
    write_three_days(tmp_path)
    path = day_file(tmp_path, DAY2)
    path.write_bytes(path.read_bytes()[:-1])
    report = verify(tmp_path)
    assert not report.ok and not report.torn_tail
    assert report.error == f"audit-{DAY2}.jsonl line 4: unterminated line before the last file"


def test_reopen_cuts_torn_tail_and_records_recovery(log10: tuple[Path, tuple[int, str]]) -> None:
    """Reopening after a crash truncates the torn bytes and writes audit.recovered first."""
    folder, head = log10
    path = day_file(folder, DAY1)
    torn = b'{"event":"file.received","file":"half'
    with path.open("ab") as file:
        file.write(torn)
    log = AuditLog(folder, clock=Clock(f"{DAY1}T12:00:00"))
    log.close()
    lines = list(read_lines(folder))
    assert lines[-1]["event"] == "audit.recovered"
    assert (lines[-1]["seq"], lines[-1]["prev"]) == (11, head[1])
    assert lines[-1]["torn_bytes"] == len(torn)
    assert lines[-1]["file"] == path.name
    assert path.read_bytes().endswith(b"\n")
    report = verify(folder, expected_head=log.head)
    assert (report.ok, report.torn_tail, report.lines) == (True, False, 11)


def test_reopen_when_newest_file_holds_only_a_torn_line(tmp_path: Path) -> None:
    """A torn-only newest file is cut and the chain goes on from the day before."""
    head = write_log(tmp_path, 3)
    day_file(tmp_path, DAY2).write_bytes(b'{"seq":4,')
    with AuditLog(tmp_path, clock=Clock(f"{DAY2}T08:00:00")) as log:
        assert log.head[0] == 4
    assert day_file(tmp_path, DAY2).read_bytes().count(b"\n") == 1
    lines = list(read_lines(tmp_path))
    assert (lines[3]["event"], lines[3]["prev"]) == ("audit.recovered", head[1])
    assert verify(tmp_path).ok


def test_reopen_refuses_an_unreadable_last_line(log10: tuple[Path, tuple[int, str]]) -> None:
    """An unreadable last complete line stops the writer instead of forking the chain."""
    folder, _ = log10
    with day_file(folder, DAY1).open("ab") as file:
        file.write(b"garbage\n")
    with pytest.raises(AuditLogCorruptError, match=f"audit-{DAY1}.jsonl"):
        AuditLog(folder)


def test_deleted_middle_line_is_found(log10: tuple[Path, tuple[int, str]]) -> None:
    """Removing line 5 is reported at line 5 as a seq gap."""
    folder, _ = log10
    path = day_file(folder, DAY1)
    lines = lines_of(path)
    path.write_bytes(b"".join(lines[:4] + lines[5:]))
    report = verify(folder)
    assert not report.ok
    assert report.error == f"audit-{DAY1}.jsonl line 5: seq 6 expected 5"


def test_edited_field_is_found(log10: tuple[Path, tuple[int, str]]) -> None:
    """Changing a field of line 5 is a hash mismatch at line 5."""
    folder, _ = log10
    path = day_file(folder, DAY1)
    path.write_bytes(path.read_bytes().replace(b'"f4.csv"', b'"f4-renamed.csv"'))
    report = verify(folder)
    assert report.error == f"audit-{DAY1}.jsonl line 5: hash mismatch (line altered)"


def test_edited_and_rehashed_line_breaks_the_next_link(
    log10: tuple[Path, tuple[int, str]],
) -> None:
    """An edited line with a recomputed hash is caught by the next line's prev."""
    folder, _ = log10
    path = day_file(folder, DAY1)
    lines = lines_of(path)
    lines[4] = rehash(lines[4].replace(b'"f4.csv"', b'"f4-renamed.csv"'))
    path.write_bytes(b"".join(lines))
    report = verify(folder)
    assert report.error == f"audit-{DAY1}.jsonl line 6: prev does not match previous hash"


def test_rehashed_last_line_is_caught_by_the_journal_head(
    log10: tuple[Path, tuple[int, str]],
) -> None:
    """An edited and rehashed last line has no successor; the journal's head hash catches it."""
    folder, head = log10
    path = day_file(folder, DAY1)
    lines = lines_of(path)
    lines[-1] = rehash(lines[-1].replace(b'"f9.csv"', b'"f9-renamed.csv"'))
    path.write_bytes(b"".join(lines))
    assert verify(folder).ok
    report = verify(folder, expected_head=head)
    assert report.error == f"audit-{DAY1}.jsonl line 10: hash of seq 10 differs from the journal's"


def test_swapped_lines_are_found(log10: tuple[Path, tuple[int, str]]) -> None:
    """Swapping lines 5 and 6 is reported at line 5."""
    folder, _ = log10
    path = day_file(folder, DAY1)
    lines = lines_of(path)
    lines[4], lines[5] = lines[5], lines[4]
    path.write_bytes(b"".join(lines))
    assert verify(folder).error == f"audit-{DAY1}.jsonl line 5: seq 6 expected 5"


def test_truncated_tail_is_found_with_the_journal_head(
    log10: tuple[Path, tuple[int, str]],
) -> None:
    """Cutting the last two lines passes alone but fails against the journal's head."""
    folder, head = log10
    path = day_file(folder, DAY1)
    path.write_bytes(b"".join(lines_of(path)[:8]))
    assert verify(folder).ok
    report = verify(folder, expected_head=head)
    assert not report.ok and report.lines == 8
    assert report.error == f"audit-{DAY1}.jsonl: log ends at seq 8 but the journal records seq 10"


def test_log_may_go_on_past_the_journal_head(tmp_path: Path) -> None:
    """Lines written after the journal recorded its head are fine."""
    head = write_log(tmp_path, 3)
    write_log(tmp_path, 2)
    assert verify(tmp_path, expected_head=head).ok


def test_swapped_day_files_are_found(tmp_path: Path) -> None:
    """Exchanging two days' files is reported at the first line of the earlier name."""
    write_three_days(tmp_path)
    first, second = day_file(tmp_path, DAY1), day_file(tmp_path, DAY2)
    first_bytes = first.read_bytes()
    first.write_bytes(second.read_bytes())
    second.write_bytes(first_bytes)
    assert verify(tmp_path).error == f"audit-{DAY1}.jsonl line 1: seq 5 expected 1"


def test_spliced_days_are_found(tmp_path: Path) -> None:
    """A day's lines moved into the previous day's file break the date rule at the first one."""
    write_three_days(tmp_path)
    first, second = day_file(tmp_path, DAY1), day_file(tmp_path, DAY2)
    first.write_bytes(first.read_bytes() + second.read_bytes())
    second.unlink()
    report = verify(tmp_path)
    assert report.error == f"audit-{DAY1}.jsonl line 5: date of ts does not match file name"


def test_deleted_middle_day_file_is_found(tmp_path: Path) -> None:
    """Removing the middle day's file is a seq gap at the first line of the next file."""
    write_three_days(tmp_path)
    day_file(tmp_path, DAY2).unlink()
    report = verify(tmp_path)
    assert (report.ok, report.files) == (False, 2)
    assert report.error == f"audit-{DAY3}.jsonl line 1: seq 9 expected 5"


def test_three_days_verify_and_read_in_order(tmp_path: Path) -> None:
    """Three day files verify as one chain and read back in seq order."""
    write_three_days(tmp_path)
    report = verify(tmp_path)
    assert (report.ok, report.lines, report.files) == (True, 12, 3)
    assert [line["seq"] for line in read_lines(tmp_path)] == list(range(1, 13))


def test_hostile_names_stay_on_one_line_and_round_trip(tmp_path: Path) -> None:
    """Names with newlines, escape sequences, invalid UTF-8 or U+2028 are escaped onto one line."""
    names = [
        "evil\nname.csv",
        "\x1b[31mred\x1b[0m\r.csv",
        b"caf\xe9-\xff\xfe.csv".decode("utf-8", "surrogateescape"),
        "line\u2028sep-\u00e9\U0001f600.csv",
    ]
    with AuditLog(tmp_path) as log:
        for name in names:
            log.append(AuditEvent.FILE_REJECTED, file=name, reason="bad_name")
    raw = next(tmp_path.glob("audit-*.jsonl")).read_bytes()
    assert raw.isascii() and b"\x1b" not in raw and b"\r" not in raw
    assert raw.count(b"\n") == len(names)
    assert [line["file"] for line in read_lines(tmp_path)] == names
    assert verify(tmp_path).ok


_EFBIG_SCRIPT = r"""
import json, resource, signal, sys
from pathlib import Path
from daemon.audit import AuditEvent, AuditLog, verify

folder = Path(sys.argv[1])
log = AuditLog(folder, clock=lambda: 1795953600.0)
log.append(AuditEvent.DAEMON_STARTED)
log.sync()
path = next(folder.glob("audit-*.jsonl"))
before, head = path.read_bytes(), log.head
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
# Room for part of the next line only: the first write is short, the second fails with EFBIG.
resource.setrlimit(resource.RLIMIT_FSIZE, (len(before) + 50, hard))
try:
    log.append(AuditEvent.FILE_RECEIVED, file="x" * 200)
    failed = None
except OSError as exc:
    failed = exc.errno
result = {"errno": failed, "intact": path.read_bytes() == before, "head_kept": log.head == head}
resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
line = log.append(AuditEvent.FILE_RECEIVED, file="x" * 200)
log.close()
report = verify(folder, expected_head=(line["seq"], line["hash"]))
result.update(seq=line["seq"], ok=report.ok, error=report.error)
print(json.dumps(result))
"""


def test_failed_write_leaves_file_and_head_intact(tmp_path: Path) -> None:
    """A write that fails part-way (EFBIG under RLIMIT_FSIZE) is cut back and can be retried."""
    # Given a process whose file size limit leaves room for only part of the next line
    completed = subprocess.run(
        [sys.executable, "-c", _EFBIG_SCRIPT, str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
        cwd=ROOT,
    )
    assert completed.returncode == 0, completed.stderr
    result = json.loads(completed.stdout)
    # Then the append raised, the file holds only the good lines and the head did not move
    assert result["errno"] == errno.EFBIG
    assert result["intact"] and result["head_kept"]
    # And the same append succeeds once there is room, continuing the chain without a gap
    assert (result["seq"], result["ok"], result["error"]) == (2, True, None)


# -- hashed file names, the name key, listeners --------------------------------------------


def test_hashed_pipeline_gets_a_keyed_hash_instead_of_the_name(tmp_path: Path) -> None:
    """In a hashed pipeline `file` is hmac-sha256 of the name; other lines keep their names."""
    key = b"k" * 32
    with AuditLog(tmp_path, hashed_pipelines=frozenset({"emr"}), name_key=key) as log:
        hashed = log.append(AuditEvent.FILE_RECEIVED, pipeline="emr", file="DOE_JANE_123456.csv")
        plain = log.append(AuditEvent.FILE_RECEIVED, pipeline="imaging", file="scan.dcm")
        other = log.append(AuditEvent.AUDIT_RECOVERED, file="audit-2026-11-29.jsonl")
    expected = hmac.new(key, b"DOE_JANE_123456.csv", hashlib.sha256).hexdigest()[:32]
    assert hashed["file"] == f"hmac-sha256:{expected}" == hash_name(key, "DOE_JANE_123456.csv")
    assert (plain["file"], other["file"]) == ("scan.dcm", "audit-2026-11-29.jsonl")
    raw = next(tmp_path.glob("audit-*.jsonl")).read_bytes()
    assert b"DOE_JANE" not in raw
    assert verify(tmp_path).ok


def test_hash_of_an_undecodable_name_is_stable(tmp_path: Path) -> None:
    """Names that are not UTF-8 (surrogate-escaped) hash as their raw bytes."""
    name = b"caf\xe9.csv".decode("utf-8", "surrogateescape")
    expected = hmac.new(b"k" * 32, b"caf\xe9.csv", hashlib.sha256).hexdigest()[:32]
    assert hash_name(b"k" * 32, name) == f"hmac-sha256:{expected}"


def test_hashed_pipelines_change_on_reload(tmp_path: Path) -> None:
    """set_hashed_pipelines applies to the next lines; hashing needs a key."""
    with AuditLog(tmp_path) as log:
        before = log.append(AuditEvent.FILE_RECEIVED, pipeline="emr", file="a.csv")
        with pytest.raises(ValueError, match="name_key"):
            log.set_hashed_pipelines(frozenset({"emr"}))
        log.set_hashed_pipelines(frozenset({"emr"}), b"k" * 32)
        after = log.append(AuditEvent.FILE_RECEIVED, pipeline="emr", file="a.csv")
        log.set_hashed_pipelines(frozenset())
        again = log.append(AuditEvent.FILE_RECEIVED, pipeline="emr", file="a.csv")
    assert before["file"] == again["file"] == "a.csv"
    assert after["file"] == hash_name(b"k" * 32, "a.csv")
    with pytest.raises(ValueError, match="name_key"):
        AuditLog(tmp_path / "other", hashed_pipelines=frozenset({"emr"}))


def test_name_key_is_created_once_with_mode_0600(tmp_path: Path) -> None:
    """load_name_key creates 32 random bytes readable by the owner only, then reuses them."""
    state = tmp_path / "state"
    assert read_name_key(state) is None
    key = load_name_key(state)
    path = state / "audit-name.key"
    assert len(key) == 32 and path.read_bytes() == key
    assert path.stat().st_mode & 0o777 == 0o600
    assert load_name_key(state) == key == read_name_key(state)
    assert sorted(p.name for p in state.iterdir()) == ["audit-name.key"]


@pytest.mark.parametrize("content", [b"", b"short", b"x" * 33])
def test_a_damaged_name_key_is_refused(tmp_path: Path, content: bytes) -> None:
    """A key of the wrong size is never replaced by a new one (old hashes would be lost)."""
    (tmp_path / "audit-name.key").write_bytes(content)
    with pytest.raises(NameKeyError, match="restore it from a backup"):
        load_name_key(tmp_path)
    assert (tmp_path / "audit-name.key").read_bytes() == content


def test_a_symlinked_name_key_is_refused(tmp_path: Path) -> None:
    """The key is opened with O_NOFOLLOW."""
    (tmp_path / "elsewhere").write_bytes(b"k" * 32)
    (tmp_path / "audit-name.key").symlink_to(tmp_path / "elsewhere")
    with pytest.raises(NameKeyError, match="cannot read"):
        read_name_key(tmp_path)


def test_listeners_see_each_recorded_event(tmp_path: Path) -> None:
    """Listeners get every recorded event once written; one that raises does not undo or stop
    the write."""
    seen: list[Record] = []

    def broken(event: Record) -> None:
        raise RuntimeError("listener bug")

    received = FileReceived(pipeline="emr", file="a.csv", sha256="0" * 64, size=1, file_id=1)
    sealed = BatchSealed(pipeline="emr", batch_id="b1", files=1, bytes=1, priority=3)
    with AuditLog(tmp_path) as log:
        log.add_listener(broken)
        log.add_listener(seen.append)
        first = log.record(received)
        log.record(sealed)
    assert seen == [received, sealed]
    assert first["event"] == "file.received" and first["file_id"] == 1
    assert verify(tmp_path, expected_head=log.head).ok


class SteppingClock(Clock):
    """Each reading 400 ms after the one before: a group of lines crosses midnight."""

    def __call__(self) -> float:
        self.now += 0.4
        return self.now


def received(i: int) -> FileReceived:
    return FileReceived(pipeline="emr", file=f"f{i}.csv", sha256=f"{i:064x}", size=i, file_id=i)


@pytest.mark.parametrize("chain_key", [None, b"k" * 32])
def test_record_many_writes_the_lines_record_writes(
    tmp_path: Path, chain_key: bytes | None
) -> None:
    """A claim group's lines written at once are byte for byte those written one by one, across
    a midnight inside the group (two day files), and the chain verifies; listeners hear each."""
    start = f"{DAY1}T23:59:58.5"
    heard: list[Record] = []
    with AuditLog(tmp_path / "one", clock=SteppingClock(start), chain_key=chain_key) as log:
        for i in range(8):
            log.record(received(i))
    with AuditLog(tmp_path / "many", clock=SteppingClock(start), chain_key=chain_key) as log:
        log.add_listener(heard.append)
        log.record_many([received(i) for i in range(8)])
        assert log.head[0] == 8
    for day in (DAY1, DAY2):
        one = day_file(tmp_path / "one", day).read_bytes()
        assert one and day_file(tmp_path / "many", day).read_bytes() == one
    assert heard == [received(i) for i in range(8)]
    report = verify(tmp_path / "many", key=chain_key)
    assert (report.ok, report.lines, report.files) == (True, 8, 2)

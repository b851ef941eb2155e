"""The claimer process: claims made in a child beside the main loop, on real files with a real
journal and audit log. A child that dies holding claims loses none of them; one that cannot
start leaves the claims to the main loop."""

from __future__ import annotations

import hashlib
import os
import signal
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from structlog.testing import capture_logs

from daemon.intake import claim
from daemon.intake import claimer as claimer_module
from daemon.intake.claim import Entry, NotYet, Taken
from daemon.intake.claimer import MAX_FAILED_STARTS, ClaimerProcess
from daemon.intake.intake import Intake
from tests.support.waiting import wait_until
from tests.unit.test_intake import GOOD, Env


class Woken:
    def __init__(self) -> None:
        self.event = threading.Event()

    def __call__(self) -> None:
        self.event.set()


def with_claimer(env: Env, claimer: ClaimerProcess) -> Env:
    env.intake = Intake(env.settings, env.journal, env.audit, claimer=claimer)
    return env


@pytest.fixture
def env(tmp_path: Path) -> Iterator[Env]:
    made = Env(tmp_path)
    yield made
    made.intake.close()
    made.close()


def drop(env: Env, count: int) -> dict[str, str]:
    """`count` distinct files in the inbox: name → sha256."""
    sums = {}
    for i in range(count):
        data = GOOD + f"f{i},{i}\n".encode()
        (env.inbox / f"f{i:05d}.csv").write_bytes(data)
        sums[f"f{i:05d}.csv"] = hashlib.sha256(data).hexdigest()
    return sums


def claim_everything(env: Env, deadline_s: float = 60) -> list[Any]:
    """Send and collect until nothing is pending; every file taken."""
    taken: list[Any] = []

    def drained() -> bool:
        env.intake.send_settled()
        taken.extend(env.intake.collect())
        return env.intake.pending == 0 and not env.intake.is_claiming

    wait_until(drained, deadline_s, 0.005, message="every candidate claimed")
    return taken


def journal_states(env: Env) -> dict[str, int]:
    rows = env.journal._db.execute("SELECT state, count(*) FROM files GROUP BY state")
    return dict(rows.fetchall())


def read_bytes_of(pid: int) -> int:
    """What the process has read so far (/proc/<pid>/io `rchar`)."""
    fields = dict(line.split(": ") for line in Path(f"/proc/{pid}/io").read_text().splitlines())
    return int(fields["rchar"])


def ready_claimer(env: Env) -> ClaimerProcess:
    """A claimer whose child is up: the second chunk started it (both were claimed here)."""
    claimer = ClaimerProcess(Woken(), "INFO")
    with_claimer(env, claimer)
    for name in ("first.csv", "second.csv"):
        (env.inbox / name).write_bytes(GOOD)
        env.intake.scan()
        assert [t.name for t in claim_everything(env)] == [name]
    wait_until(lambda: claimer.pid is not None, 30, message="the claimer ready")
    assert claimer.pid != os.getpid()
    return claimer


def test_every_finished_chunk_wakes_the_main_loop(env: Env) -> None:
    """While the claimer holds all the chunks it may, the main loop waits for a wake: a chunk
    claimed here (the child still starting) wakes it as surely as one the child returns."""
    woken = Woken()
    claimer = ClaimerProcess(woken, "INFO")
    with_claimer(env, claimer)
    for name in ("here.csv", "while-starting.csv", "in-child.csv"):
        if name == "in-child.csv":
            wait_until(lambda: claimer.pid is not None, 30, message="the claimer ready")
        woken.event.clear()
        (env.inbox / name).write_bytes(GOOD)
        env.intake.scan()
        env.intake.send_settled()
        assert woken.event.wait(30), f"no wake for the chunk of {name}"
        assert [t.name for t in env.intake.collect()] == [name]


def test_claims_are_made_in_the_child(env: Env) -> None:
    """Once its imports are done, the child makes the claims (it reads every file to hash it):
    same outcome as in this process, each file once in the spool and the journal, hashed."""
    claimer = ready_claimer(env)
    assert claimer.pid is not None
    read_before = read_bytes_of(claimer.pid)
    sums = drop(env, 300)
    env.intake.scan()
    taken = claim_everything(env)
    assert {t.name: t.sha256 for t in taken} == sums
    assert read_bytes_of(claimer.pid) - read_before >= sum(t.size for t in taken)
    assert journal_states(env) == {"received": 302}
    assert all(Path(t.spool_path).read_bytes().startswith(GOOD) for t in taken)
    assert list(env.inbox.iterdir()) == []


def test_a_claimer_killed_holding_claims_loses_none(env: Env) -> None:
    """kill -9 while it works through a chunk: entries it moved are hashed by the main loop,
    the others are claimed again; each file is received once, none stays half-claimed."""
    claimer = ready_claimer(env)
    first = claimer.pid
    assert first is not None
    sums = drop(env, 3000)
    env.intake.scan()
    spool = env.root / "state" / "spool" / "emr"
    os.kill(first, signal.SIGSTOP)  # held mid-way: kill it with part of the chunk moved
    env.intake.send_settled(limit=3000)
    os.kill(first, signal.SIGCONT)
    wait_until(lambda: len(list(spool.iterdir())) > 2, 30, 0.0005, message="claims moved")
    os.kill(first, signal.SIGKILL)
    moved_when_killed = len(list(spool.iterdir())) - 2
    taken = claim_everything(env)
    assert 0 < moved_when_killed < 3000
    assert sorted(t.name for t in taken) == sorted(sums)
    assert {t.name: t.sha256 for t in taken} == sums
    assert journal_states(env) == {"received": 3002}
    assert len(list(spool.iterdir())) == 3002
    wait_until(lambda: claimer.pid not in (None, first), 30, message="a new claimer")


def test_a_claimer_that_cannot_start_leaves_the_claims_to_the_main_loop(env: Env) -> None:
    """A child that exits at once, again and again (the main loop claims while each starts):
    after a few tries the main loop claims for good, says so once, and nothing is lost."""
    command = [sys.executable, "-c", "import sys; sys.exit(3)"]
    sums: dict[str, str] = {}
    taken: list[Any] = []
    with capture_logs() as logs:
        claimer = ClaimerProcess(Woken(), "INFO", command=command)
        with_claimer(env, claimer)

        def given_up() -> bool:
            name = f"f{len(sums):05d}.csv"
            (env.inbox / name).write_bytes(GOOD)
            sums[name] = hashlib.sha256(GOOD).hexdigest()
            env.intake.scan()
            taken.extend(claim_everything(env))
            return any(line["event"] == "intake.claimer_unavailable" for line in logs)

        wait_until(given_up, 30, 0.05, message="the claims left to the main loop")
        taken += claim_everything(env)
    assert sorted(t.name for t in taken) == sorted(sums)
    assert claimer.pid is None
    assert journal_states(env) == {"received": len(sums)}
    events = [line["event"] for line in logs]
    assert events.count("intake.claimer_unavailable") == 1
    assert events.count("intake.claimer_died") == MAX_FAILED_STARTS


def test_an_entry_a_dead_claimer_held_is_finished_like_an_interrupted_claim(env: Env) -> None:
    """In the spool: hashed (a half-made private copy removed first). Not in the spool: still
    in the inbox, a candidate again."""
    pipeline = env.settings.pipeline[0]
    spool = env.root / "state" / "spool" / "emr"
    (spool / "1-a.csv").write_bytes(GOOD)
    (spool / ".1-a.csv.copy").write_bytes(GOOD[:4])
    moved = Entry(1, "emr", "a.csv", str(spool / "1-a.csv"), is_settled=True)
    assert claim.finish_lost(moved, pipeline) == Taken(hashlib.sha256(GOOD).hexdigest(), len(GOOD))
    assert sorted(p.name for p in spool.iterdir()) == ["1-a.csv"]
    (env.inbox / "b.csv").write_bytes(GOOD)
    left = Entry(2, "emr", "b.csv", str(spool / "2-b.csv"), is_settled=True)
    assert claim.finish_lost(left, pipeline) == NotYet(None)
    assert (env.inbox / "b.csv").exists()


def test_the_child_dies_with_the_service(tmp_path: Path) -> None:
    """PR_SET_PDEATHSIG: a claimer whose service was killed cannot go on moving files that
    the next start's recovery is looking at."""
    script = tmp_path / "parent.py"
    script.write_text(
        "import sys, time\n"
        "from daemon.intake.claimer import ClaimerProcess\n"
        "from daemon.logs import configure_logging\n"
        "configure_logging('WARNING')\n"
        "c = ClaimerProcess(lambda: None, 'INFO')\n"
        "c.start()\n"
        "while c.pid is None: time.sleep(0.01)\n"
        "print(c.pid, flush=True)\n"
        "time.sleep(60)\n"
    )
    with subprocess.Popen(
        [sys.executable, str(script)], stdout=subprocess.PIPE, text=True
    ) as parent:
        assert parent.stdout is not None
        child = int(parent.stdout.readline())
        os.kill(parent.pid, signal.SIGKILL)
        parent.wait(timeout=10)

    def gone() -> bool:
        try:
            state = Path(f"/proc/{child}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            return True
        return state == "Z"

    wait_until(gone, 10, message="the claimer gone with its parent")


def test_the_claimer_child_loads_only_what_a_claim_needs() -> None:
    """It starts beside the service's start-up on the same cores: none of the config (pydantic),
    the journal (sqlite3), the audit log or the data libraries is imported by the child."""
    heavy = ("pydantic", "daemon.config", "sqlite3", "daemon.journal", "daemon.audit", "pandas",
             "numpy", "pyarrow", "daemon.intake.intake", "daemon.service")  # fmt: skip
    probe = f"import sys, daemon.intake.claimer; print([m for m in {heavy!r} if m in sys.modules])"
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_nothing_moves_before_its_intent_is_durable(
    env: Env, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The intent rows are committed without an fsync: the claimer makes the journal's WAL
    durable before it moves a chunk's first entry (here the first chunk, claimed in this
    process; the child runs the same `claim_chunk`)."""
    seen: list[tuple[str, list[str]]] = []
    real = claimer_module.sync_file

    def spy(path: str) -> None:
        seen.append((path, sorted(p.name for p in env.inbox.iterdir())))
        real(path)

    monkeypatch.setattr(claimer_module, "sync_file", spy)
    (env.inbox / "a.csv").write_bytes(GOOD)
    env.intake.scan()
    assert [t.name for t in claim_everything(env)] == ["a.csv"]
    assert seen == [(env.journal.wal_path, ["a.csv"])], "synced while still in the inbox"


def test_a_child_that_cannot_sync_the_journal_moves_nothing(env: Env) -> None:
    """A WAL the child cannot make durable (here its path runs through a file): every entry of
    the chunk stays in the inbox, its intent dropped, and is claimed once the journal syncs."""
    ready_claimer(env)
    wal = env.journal.wal_path
    blocker = env.root / "not-a-folder"
    blocker.write_bytes(b"")
    env.journal.wal_path = str(blocker / "journal.db-wal")
    sums = drop(env, 20)
    env.intake.scan()

    def returned() -> bool:
        env.intake.send_settled()
        env.intake.collect()
        return not env.intake.is_claiming and journal_states(env) == {"received": 2}

    wait_until(returned, 30, 0.005, message="the chunk back, nothing claimed")
    assert sorted(p.name for p in env.inbox.iterdir()) == sorted(sums)
    env.journal.wal_path = wal
    taken = claim_everything(env)
    assert {t.name: t.sha256 for t in taken} == sums
    assert list(env.inbox.iterdir()) == []


class Replies:
    """The ids each archive lot moved, as the reader thread hands them back."""

    def __init__(self) -> None:
        self.got: list[list[int]] = []
        self.event = threading.Event()

    def __call__(self, moved: list[int]) -> None:
        self.got.append(moved)
        self.event.set()


def spooled(env: Env, count: int) -> list[tuple[int, str, str | None]]:
    """`count` inputs in the spool, as archive moves into `archive/day/`."""
    spool, day = env.root / "state" / "spool" / "emr", env.root / "archive" / "day"
    spool.mkdir(parents=True, exist_ok=True)
    moves: list[tuple[int, str, str | None]] = []
    for i in range(count):
        (spool / f"p{i}.csv").write_bytes(GOOD)
        moves.append((1000 + i, str(spool / f"p{i}.csv"), str(day / f"p{i}.csv")))
    return moves


def test_the_claimer_archives_a_lot_once_the_journal_is_synced(env: Env) -> None:
    """Archive renames run in the child (not on a thread of the service, where they queue for
    the GIL behind the main loop): the day folder made, each input moved, its id replied; a
    journal that cannot be synced moves nothing (the lot comes back empty, tried again later)."""
    claimer = ready_claimer(env)
    moves = spooled(env, 300)
    folder = str(env.root / "archive" / "day")
    (env.root / "plain").write_bytes(b"")
    unsyncable = str(env.root / "plain" / "journal.db-wal")  # ENOTDIR: cannot be synced
    replies = Replies()
    assert claimer.archive(moves[:100], [folder], replies, journal_wal=unsyncable)
    assert replies.event.wait(30)
    assert replies.got == [[]] and all(Path(source).exists() for _, source, _ in moves)

    replies.event.clear()
    wal = env.journal.wal_path
    assert claimer.archive(moves, [folder], replies, journal_wal=wal)
    assert replies.event.wait(30)
    assert replies.got[1] == [file_id for file_id, _, _ in moves]
    assert sorted(p.name for p in Path(folder).iterdir()) == sorted(f"p{i}.csv" for i in range(300))
    assert not any(Path(source).exists() for _, source, _ in moves)


def test_a_lot_the_claimer_dies_holding_comes_back_empty(env: Env) -> None:
    """kill -9 with a lot handed over: its reply is [] (the inputs stay undisposed, and the
    next disposal moves what is left); with no child ready, the lot is refused (the archiver's
    thread takes it) and a child started for the next."""
    claimer = ready_claimer(env)
    child = claimer.pid
    assert child is not None
    moves = spooled(env, 50)
    replies = Replies()
    os.kill(child, signal.SIGSTOP)
    assert claimer.archive(moves, [], replies, journal_wal=env.journal.wal_path)
    os.kill(child, signal.SIGKILL)
    assert replies.event.wait(30)
    assert replies.got == [[]]
    # No child ready: refused (the archiver's thread moves the lot), and one is started
    assert not claimer.archive(moves, [], replies, journal_wal=env.journal.wal_path)
    wait_until(lambda: claimer.pid not in (None, child), 30, message="a new child")
    fresh = ClaimerProcess(Woken(), "INFO")  # a process only for archive lots starts alike
    try:
        assert not fresh.archive(moves, [], replies, journal_wal=env.journal.wal_path)
        wait_until(lambda: fresh.pid is not None, 30, message="the mover ready")
        assert fresh.archive(moves, [], replies, journal_wal=env.journal.wal_path)
        wait_until(lambda: len(replies.got) == 2, 30, message="the lot moved")
        assert replies.got[1] == [file_id for file_id, _, _ in moves]
    finally:
        fresh.close()


def test_a_stalled_child_never_blocks_the_main_loop_handing_it_lots(env: Env) -> None:
    """A stopped child (SIGSTOP) with lots piling up: they are refused (the archiver's thread
    takes them) before its pipe could fill, so handing one over never blocks; once it runs
    again, every lot it took is moved and replied."""
    claimer = ready_claimer(env)
    child = claimer.pid
    assert child is not None
    moves = spooled(env, 500)
    lot = [(i, source, f"{target}-{'x' * 200}") for i, source, target in moves if target]
    replies = Replies()
    accepted: list[bool] = []

    def hand_over() -> None:
        for _ in range(40):  # ~170 KB a lot: 40 would be 7 MB, past any pipe
            accepted.append(claimer.archive(lot, [], replies, journal_wal=env.journal.wal_path))

    os.kill(child, signal.SIGSTOP)
    try:
        sender = threading.Thread(target=hand_over)
        sender.start()
        sender.join(30)
        assert not sender.is_alive(), "handing a lot to a stalled child blocked"
    finally:
        os.kill(child, signal.SIGCONT)
    taken = accepted.count(True)
    assert 1 <= taken < 40 and accepted == [True] * taken + [False] * (40 - taken)
    wait_until(lambda: len(replies.got) == taken, 30, message="the lots it took replied")

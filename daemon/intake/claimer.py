"""Where claims are made: in this process, or in a claimer process beside the main loop.

The kernel side of a claim (two opens, a lease, a rename, an lstat, a read and a hash: about
60 µs a small file) was a third of the main loop's time on a backlog. On a thread it would queue
on the GIL with the loop (measured: no gain), so the service runs it in a child process of its
own, while the loop commits the previous chunk. The journal stays the loop's: a chunk is sent
only once its intent rows are committed, and its outcomes are written when they come back; the
claimer makes those rows durable (an fdatasync of the WAL) before it moves anything.

The child dies with the service (PR_SET_PDEATHSIG), ignores SIGTERM and SIGINT (the service
stops it by closing its pipe, once the chunks it holds are back) and never touches the journal.
When it dies, the chunks it held come back as lost, and the main loop finishes each entry as
recovery finishes an interrupted claim (`claim.finish_lost`); the next chunk starts a new child.
The same child code moves published inputs into the archive (`ArchiveLot`) for the service's
archiver, in a second child of that role (`disposal.mover`).

    python -m daemon.intake.claimer LEVEL READ_FD WRITE_FD PARENT_PID ROLE
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import fcntl
import itertools
import os
import signal
import subprocess
import sys
import threading
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from functools import partial
from multiprocessing.connection import Connection
from pathlib import Path

import structlog

from daemon.archiving import Move, archive_lot
from daemon.fsutil import sync_file
from daemon.intake.claim import Entry, NotYet, Outcome, claim_all
from daemon.intake.refusal import ClaimRules
from daemon.logs import configure_logging

log = structlog.get_logger()

_PR_SET_PDEATHSIG = 1
_PIPE_BYTES = 1 << 20  # two chunks of 500 entries (~75 KB each) never block the loop's send
_MOVE_BYTES = 64  # an archive move pickled, besides its two paths (an overestimate)
STOP_WAIT_S = 30.0
_READY = -1  # the child's first message: its imports are done
_ARCHIVED = -2  # a lot of archive moves is back: (_ARCHIVED, (lot_id, ids moved))
COMMAND = (sys.executable, "-m", "daemon.intake.claimer")
# Children in a row that died before returning a chunk: claims then stay in the main loop.
MAX_FAILED_STARTS = 3


@dataclass(frozen=True, slots=True)
class Chunk:
    chunk_id: int
    inbox: Path
    pipelines: Mapping[str, ClaimRules]  # those of its entries
    entries: list[Entry]
    # The journal's WAL, when the entries' intent rows were committed without an fsync: it is
    # made durable before any entry moves (here, not on the main loop, which goes on meanwhile).
    journal_wal: str | None = None


def claim_chunk(chunk: Chunk, unsafe: set[str]) -> list[Outcome]:
    """The chunk's outcomes, in order. Nothing moves before its intent is durable: a journal
    that cannot be synced leaves every entry in the inbox, looked at again later."""
    if chunk.journal_wal is not None:
        try:
            sync_file(chunk.journal_wal)
        except OSError as exc:
            log.error("intake.journal_sync_failed", errno=errno.errorcode.get(exc.errno or 0))
            return [NotYet(None) for _ in chunk.entries]
    return claim_all(chunk.inbox, chunk.entries, chunk.pipelines, unsafe)


@dataclass(frozen=True, slots=True)
class ArchiveLot:
    """Published inputs to rename into the archive (or delete), once the WAL is synced."""

    lot_id: int
    moves: list[Move]
    folders: list[str]
    journal_wal: str


# A chunk's outcomes, in its entries' order; None: the claimer died holding it.
Finished = tuple[int, list[Outcome] | None]


class InProcessClaimer:
    """Claims at once, in the calling thread (tests drive intake this way)."""

    def __init__(self) -> None:
        self._unsafe: set[str] = set()
        self._finished: list[Finished] = []

    def start(self) -> None:
        pass

    def submit(self, chunk: Chunk) -> None:
        self._finished.append((chunk.chunk_id, claim_chunk(chunk, self._unsafe)))

    def take_finished(self) -> list[Finished]:
        finished, self._finished = self._finished, []
        return finished

    def close(self) -> None:
        pass


@dataclass(slots=True)
class _Link:
    """One claimer child: its pipe, its reader thread, the chunks it holds."""

    child: subprocess.Popen[bytes]
    to_child: Connection
    held: set[int] = field(default_factory=set)
    lots: dict[int, tuple[Callable[[list[int]], None], int]] = field(default_factory=dict)
    lot_bytes: int = 0  # about what the lots it holds take in its pipe
    returned: int = 0  # chunks it sent back
    is_ready: bool = False  # imports done: until then the main loop claims itself
    is_done: bool = False  # ended: what it held was reported lost


class ClaimerProcess:
    """The claimer child, and a thread that reads its outcomes and wakes the main loop. A
    service whose inboxes are empty at start starts it then; with a backlog, the second chunk
    starts it (the first is claimed here at once: neither the child's start nor its imports
    delay the service's first claim); until it is ready, chunks are claimed here.
    A child that keeps dying before it returns a chunk (it cannot start here) leaves the claims
    to this process, said once. The service runs a second one given only archive lots (role
    `disposal.mover`): the archiver's renames, off the main loop's GIL and the claims' way."""

    def __init__(
        self,
        wake: Callable[[], None],
        log_level: str,
        command: Sequence[str] = COMMAND,
        role: str = "intake.claimer",
    ) -> None:
        self._wake = wake
        self._role = role  # its log events' prefix, and the last word of its command line
        self._log_level = log_level
        self._command = list(command)
        self._lock = threading.Lock()
        self._finished: list[Finished] = []
        self._link: _Link | None = None
        self._readers: list[threading.Thread] = []
        self._failed_starts = 0
        self._here = InProcessClaimer()
        self._has_submitted = False
        self._lot_ids = itertools.count()

    def start(self) -> None:
        """Start the child now (else the first chunk starts it)."""
        self._live_link()

    def submit(self, chunk: Chunk) -> None:
        link = self._live_link() if self._has_submitted else None
        self._has_submitted = True
        if link is None or not link.is_ready:
            self._here.submit(chunk)
            with self._lock:
                self._finished += self._here.take_finished()
            self._wake()  # finished at once: the main loop, which waits for this, takes it
            return
        with self._lock:
            is_lost = link.is_done  # it ended since: the chunk comes back lost, claimed again
            if is_lost:
                self._finished.append((chunk.chunk_id, None))
            else:
                link.held.add(chunk.chunk_id)
        if is_lost:
            self._wake()
            return
        with contextlib.suppress(OSError):  # it died: its reader reports this chunk lost
            link.to_child.send(chunk)

    def archive(
        self,
        moves: list[Move],
        folders: list[str],
        reply: Callable[[list[int]], None],
        *,
        journal_wal: str,
    ) -> bool:
        """Hand the child archive moves (`daemon.disposal.Archiver`'s remote); False when no
        child is ready (the first call starts one), or while the lots it holds would fill half
        its pipe: a stalled child never blocks the main loop's send. `reply(ids moved)` is
        called from the reader thread; with [] if the child dies holding the lot."""
        link = self._live_link()
        if link is None or not link.is_ready:
            return False
        lot_id = next(self._lot_ids)
        size = sum(len(source) + len(target or "") + _MOVE_BYTES for _, source, target in moves)
        with self._lock:
            if link.is_done or link.lot_bytes + size > _PIPE_BYTES // 2:
                return False
            link.lots[lot_id] = (reply, size)
            link.lot_bytes += size
        with contextlib.suppress(OSError):  # it died: its reader replies for this lot
            link.to_child.send(ArchiveLot(lot_id, moves, folders, journal_wal))
        return True

    def take_finished(self) -> list[Finished]:
        with self._lock:
            finished, self._finished = self._finished, []
        if any(outcomes is None for _, outcomes in finished):
            self._live_link()  # the next child's imports overlap the lost chunks' handling
        return finished

    @property
    def pid(self) -> int | None:
        """The child claiming now (None: claims are made in this process)."""
        link = self._link
        return link.child.pid if link is not None and link.is_ready else None

    def close(self) -> None:
        """Let the child finish the chunks it holds, and end (their outcomes stay to take)."""
        link, self._link = self._link, None
        if link is not None:
            link.to_child.close()
        for reader in self._readers:
            reader.join(STOP_WAIT_S)
        self._readers = []

    def _live_link(self) -> _Link | None:
        if self._link is not None and not self._link.is_done:
            return self._link
        if self._link is not None:
            self._link.to_child.close()
            self._failed_starts = 0 if self._link.returned else self._failed_starts + 1
        self._link = None
        if self._failed_starts >= MAX_FAILED_STARTS:
            if self._failed_starts == MAX_FAILED_STARTS:
                self._failed_starts += 1
                log.error(f"{self._role}_unavailable", work="in the main process")
            return None
        try:
            self._link = self._start()
        except OSError as exc:
            self._failed_starts += 1
            log.error(f"{self._role}_start_failed", errno=errno.errorcode.get(exc.errno or 0))
        return self._link

    def _start(self) -> _Link:
        to_child_r, to_child_w = os.pipe()
        from_child_r, from_child_w = os.pipe()
        with contextlib.suppress(OSError):
            fcntl.fcntl(to_child_w, fcntl.F_SETPIPE_SZ, _PIPE_BYTES)
        args = [*self._command, self._log_level, str(to_child_r), str(from_child_w),
                str(os.getpid()), self._role]  # fmt: skip
        try:
            child = subprocess.Popen(args, pass_fds=(to_child_r, from_child_w))
        except OSError:
            os.close(to_child_w)
            os.close(from_child_r)
            raise
        finally:
            os.close(to_child_r)
            os.close(from_child_w)
        link = _Link(child, Connection(to_child_w, readable=False))
        from_child = Connection(from_child_r, writable=False)
        reader = threading.Thread(
            target=self._read, args=(link, from_child), name="medbatch-claimer-reader", daemon=True
        )
        self._readers = [r for r in self._readers if r.is_alive()] + [reader]
        reader.start()
        return link

    def _read(self, link: _Link, from_child: Connection) -> None:
        try:
            while True:
                chunk_id, outcomes = from_child.recv()
                if chunk_id == _READY:
                    link.is_ready = True
                    log.info(f"{self._role}_ready", pid=link.child.pid)
                    continue
                if chunk_id == _ARCHIVED:
                    lot_id, moved = outcomes
                    with self._lock:
                        reply, size = link.lots.pop(lot_id)
                        link.lot_bytes -= size
                    reply(moved)
                    continue
                with self._lock:
                    link.held.discard(chunk_id)
                    link.returned += 1
                    self._finished.append((chunk_id, outcomes))
                self._wake()
        except (EOFError, OSError):
            pass
        finally:
            from_child.close()
        # The child ended (or closed its pipe): it is gone for good before what it held is
        # looked at again.
        with contextlib.suppress(subprocess.TimeoutExpired):
            link.child.wait(timeout=STOP_WAIT_S)
        link.child.kill()
        code = link.child.wait()
        with self._lock:
            lost, link.held, link.is_done = link.held, set(), True
            self._finished += [(chunk_id, None) for chunk_id in sorted(lost)]
            lots, link.lots = link.lots, {}
        if code != 0 or lost or lots:
            log.error(f"{self._role}_died", exitcode=code, chunks_lost=len(lost),
                      archive_lots_lost=len(lots))  # fmt: skip
        for reply, _ in lots.values():
            reply([])
        self._wake()


def _die_with_parent(parent_pid: int) -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    if os.getppid() != parent_pid:  # the parent died before the prctl took effect
        os._exit(1)


def main(argv: list[str]) -> int:
    level, read_fd, write_fd, parent_pid, _role = argv  # the role: for `ps` to show
    _die_with_parent(int(parent_pid))
    for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGIO):
        signal.signal(signum, signal.SIG_IGN)  # SIGIO: a writer opening a file we hold leased
    configure_logging(level)
    from_parent = Connection(int(read_fd), writable=False)
    to_parent = Connection(int(write_fd), readable=False)
    unsafe: set[str] = set()
    to_parent.send((_READY, None))
    while True:
        try:
            work: Chunk | ArchiveLot = from_parent.recv()
        except EOFError:
            return 0
        if isinstance(work, ArchiveLot):
            moved = archive_lot(partial(sync_file, work.journal_wal), work.moves, work.folders)
            to_parent.send((_ARCHIVED, (work.lot_id, moved)))
        else:
            to_parent.send((work.chunk_id, claim_chunk(work, unsafe)))


if __name__ == "__main__":
    # Run as the package's module, not as __main__: what the parent pickles names its classes.
    from daemon.intake.claimer import main as package_main

    sys.exit(package_main(sys.argv[1:]))

"""Disposal: where a finished input goes — archive, deletion or quarantine — and its paths.

Main loop only, after the journal commit (idempotent: a crash in between is finished by
recovery), except the renames into the archive and the deletions: the `Archiver` hands them to
a process of its own (a thread until it is up), and the main loop marks them disposed when they
are done. `trace` derives the same paths
from here.
"""

from __future__ import annotations

import contextlib
import errno
import functools
import hashlib
import json
import os
import stat
import threading
import time
import unicodedata
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import structlog

from daemon.archiving import Move, archive_all, archive_lot
from daemon.audit.names import hash_name, hashed_file_name, load_name_key
from daemon.config import PathsConfig, Pipeline
from daemon.fsutil import atomic_write, iso_utc, make_folder, utc_day
from daemon.journal import FileRow, Journal
from daemon.models import Facts, FileState

log = structlog.get_logger()

SIDECAR_SUFFIX = ".error.json"
# Kept inputs are raw patient data, and a sidecar names its input: both private to the service
# (operators read them as the service's user); the folders stay listable by the group.
PRIVATE_MODE = 0o600
# NAME_MAX is 255 bytes: room for ".error.json" and a ".NNN" collision counter.
SAFE_NAME_MAX_BYTES = 200
# Inputs the archive or quarantine refused (a folder that cannot be made, a full or read-only
# disk) are tried again this long after, doubling up to RETRY_MAX_S, even when no batch finishes
# meanwhile: they wait in the spool, never lost, and leave as soon as the cause is gone.
RETRY_S = 10.0
RETRY_MAX_S = 600.0


def safe_name(name: str) -> str:
    """A file name that is safe to create and to show: `name` where it is plain printable text;
    otherwise '/', control and format characters (newline, ESC, bidi overrides) and bytes that
    were not UTF-8 written as escapes, a leading '-' guarded, and anything longer than
    SAFE_NAME_MAX_BYTES cut (with a hash of the whole, so that cut names stay apart)."""
    text = os.fsencode(name).decode("utf-8", "backslashreplace")
    out = []
    for char in text:
        if char == "/" or (unicodedata.category(char)[0] in "CZ" and char != " "):
            code = ord(char)
            out.append(f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}")
        else:
            out.append(char)
    text = "".join(out)
    if text.startswith(("-", ".")) or text in ("", ".", ".."):
        text = "_" + text
    if len(text.encode("utf-8")) > SAFE_NAME_MAX_BYTES:
        digest = hashlib.sha256(name.encode("utf-8", "surrogateescape")).hexdigest()[:12]
        suffix = Path(text).suffix
        suffix = suffix if len(suffix.encode("utf-8")) <= 16 else ""
        keep = SAFE_NAME_MAX_BYTES - len(digest) - 1 - len(suffix.encode("utf-8"))
        head = text.encode("utf-8")[:keep].decode("utf-8", "ignore")
        text = f"{head}~{digest}{suffix}"
    return text


def _restrict(path: Path) -> None:
    """Make a moved input PRIVATE_MODE without following a link or opening a FIFO or device, and
    without touching a file that has another name elsewhere (its mode is that file's mode).
    Not ours to change when owned by another user: the folder's mode protects it then."""
    st = os.lstat(path)
    if not stat.S_ISREG(st.st_mode) or st.st_nlink != 1:
        return
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
        try:
            if os.fstat(fd).st_ino == st.st_ino:
                os.fchmod(fd, PRIVATE_MODE)
        finally:
            os.close(fd)


def move_aside(source: Path, folder: Path, name: str) -> Path:
    """Rename `source` into `folder` as `safe_name(name)` (never overwriting), PRIVATE_MODE;
    return where it went."""
    make_folder(folder)
    base = safe_name(name)
    if base.endswith(SIDECAR_SUFFIX):
        # A producer's `x.error.json` must never pass for a sidecar (trace, page, retention).
        base += ".input"
    target = folder / base
    n = 1
    while os.path.lexists(target) or os.path.lexists(f"{target}{SIDECAR_SUFFIX}"):
        target = folder / f"{base}.{n}"
        n += 1
    os.rename(source, target)
    _restrict(target)
    return target


def quarantine(source: Path, folder: Path, name: str, sidecar: dict[str, Any]) -> Path:
    """Move a refused input to `<quarantine>/<pipeline>/<name>` with `<name>.error.json`.

    `name` is made safe first (`safe_name`); the sidecar records the original name as data.
    """
    target = move_aside(source, folder, name)
    data = (json.dumps(sidecar, indent=2, ensure_ascii=True) + "\n").encode("ascii")
    # Written aside and renamed: whoever reads the quarantine never sees half a sidecar.
    atomic_write(target.with_name(target.name + SIDECAR_SUFFIX), data, PRIVATE_MODE)
    return target


def archive_path(paths: PathsConfig, row: FileRow) -> Path:
    """Where a published input is archived: `<archive>/<pipeline>/<day received>/<spool name>`."""
    folder = _archive_folder(str(paths.archive), row)
    return Path(f"{folder}/{row.spool_name.rpartition('/')[2]}")


def _archive_folder(archive: str, row: FileRow) -> str:
    # Strings, not Paths: one batch disposes of thousands of inputs on the main loop.
    return f"{archive}/{row.pipeline}/{utc_day(row.received_at)}"


def sidecar(
    row: FileRow, detail: str, batch_id: str | None = None, name: str | None = None
) -> dict[str, Any]:
    """The `.error.json` beside a quarantined input; `name` as published (hashed by default)."""
    return {
        "name": row.name if name is None else name,
        "pipeline": row.pipeline,
        "reason": row.reason,
        "detail": detail,
        "sha256": row.sha256 or "",
        "size": row.size or 0,
        "batch_id": batch_id if batch_id is not None else row.batch_id,
        "quarantined_at": iso_utc(),
    }


# Hands a lot to another process: (moves, folders, reply) -> False when it cannot take it.
# `reply(done ids)` comes from another thread, with [] for a lot that process died holding.
Remote = Callable[[list[Move], list[str], Callable[[list[int]], None]], bool]
STOP_WAIT_S = 30.0


class Archiver:
    """Renames into the archive, and deletions, off the main loop: on ext4 a rename costs
    ~16 µs of kernel time, a third of a second of the main loop per 20,000 small inputs, and a
    deletion more. The service hands each lot to a process of its own (`remote`): on a thread
    here each rename's return queued for the GIL behind the main loop, and its 20,000 renames
    cost the loop a whole CPU-second (bench/NOTES.md round 11). Until that process is up (or
    if it cannot start), a thread of its own does them. The journal stays the main loop's: a
    finished lot waits in `finished` and `wake` tells the main loop, which marks it disposed.
    A crash before that leaves the rows undisposed: recovery moves again, and finds the
    sources gone."""

    def __init__(
        self,
        wake: Callable[[], None],
        sync: Callable[[], None] = lambda: None,
        remote: Remote | None = None,
        close_remote: Callable[[], None] = lambda: None,
    ) -> None:
        self._wake = wake
        self._sync = sync  # makes the journal durable: each lot's published marks, first
        self._remote = remote  # syncs the journal itself
        self._close_remote = close_remote
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="archiver")
        self._lock = threading.Condition()
        self._finished: list[tuple[list[int], list[int]]] = []  # (ids handed over, ids done)
        self._remote_lots = 0  # handed to the remote, not back yet

    def move(self, moves: list[Move], folders: set[str]) -> None:
        handed = [m[0] for m in moves]
        if self._remote is not None:
            with self._lock:
                self._remote_lots += 1
            if self._remote(moves, sorted(folders), functools.partial(self._back, handed)):
                return
            with self._lock:
                self._remote_lots -= 1
        self._pool.submit(self._run, moves, folders)

    def _back(self, handed: list[int], done: list[int]) -> None:
        with self._lock:
            self._remote_lots -= 1
            self._lock.notify_all()
        self._finish(handed, done)

    def _run(self, moves: list[Move], folders: set[str]) -> None:
        done: list[int] = []
        try:
            done = archive_lot(self._sync, moves, folders)
        finally:  # whatever happened, the lot is handed back (the rest is tried again later)
            self._finish([m[0] for m in moves], done)

    def _finish(self, handed: list[int], done: list[int]) -> None:
        with self._lock:
            self._finished.append((handed, done))
        self._wake()

    def take_finished(self) -> list[tuple[list[int], list[int]]]:
        with self._lock:
            finished, self._finished = self._finished, []
        return finished

    def close(self) -> None:
        """Wait for the renames handed over (the main loop then collects them); a remote that
        does not answer in STOP_WAIT_S leaves its lots undisposed, moved again at the next start."""
        self._pool.shutdown(wait=True)
        with self._lock:
            self._lock.wait_for(lambda: self._remote_lots == 0, STOP_WAIT_S)
        self._close_remote()


class Disposal:
    """Moves terminal inputs out of the spool: archive (or delete) or quarantine.

    With an `Archiver`, the archive renames and deletions happen on its thread and `collect()`
    (main loop) marks them disposed; without one, `dispose()` makes them itself."""

    def __init__(
        self,
        paths: PathsConfig,
        journal: Journal,
        pipelines: Callable[[], Mapping[str, Pipeline]],
        archiver: Archiver | None = None,
    ) -> None:
        self._paths = paths
        self._journal = journal
        self._pipelines = pipelines
        self._archiver = archiver
        self._moving: set[int] = set()  # handed to the archiver, not yet collected
        self._failures = 0  # dispositions in a row that left inputs behind
        self._retry_at: float | None = None  # monotonic

    def retry_due(self) -> None:
        """Heartbeat: inputs left behind by a refused disposition are tried again when due."""
        if self._retry_at is not None and time.monotonic() >= self._retry_at:
            self._retry_at = None
            self.dispose()

    def _note(self, *, left_behind: bool) -> None:
        if not left_behind:
            self._failures = 0
            return
        self._failures += 1
        wait_s = min(RETRY_S * 2 ** (self._failures - 1), RETRY_MAX_S)
        self._retry_at = time.monotonic() + wait_s
        log.warning("disposal.retry_scheduled", failures=self._failures, retry_in_s=wait_s)

    def dispose(self, batch_id: str | None = None) -> int:
        """Dispose of every undisposed terminal input (with `batch_id`, those of one batch: a
        batch's outcome looks up its own files, not every file in flight); return how many."""
        rows = self._journal.undisposed(skip=self._moving, batch_id=batch_id)
        pipelines = self._pipelines()
        spool, archive = f"{self._paths.spool}/", str(self._paths.archive)
        moves: list[Move] = []
        folders: set[str] = set()
        done: list[int] = []
        quarantined_as: list[tuple[int, str]] = []
        for row in rows:
            source = spool + row.spool_name
            pipeline = pipelines.get(row.pipeline)
            try:
                if row.state == FileState.QUARANTINED:
                    detail = str(self._journal.file_facts(row.id).get("detail", ""))
                    folder = self._paths.quarantine / row.pipeline
                    as_name, shown = self._published(row, pipeline)
                    card = sidecar(row, detail, name=shown)
                    quarantined_as.append(
                        (row.id, quarantine(Path(source), folder, as_name, card).name)
                    )
                elif pipeline is not None and pipeline.after_publish == "delete":
                    moves.append((row.id, source, None))
                    continue
                else:
                    day = _archive_folder(archive, row)
                    folders.add(day)
                    # Spool names are unique: the archived copy keeps it, nothing to compare.
                    moves.append((row.id, source, f"{day}/{row.spool_name.rpartition('/')[2]}"))
                    continue
            except FileNotFoundError:
                pass  # moved before a crash, after the journal commit: already done
            except OSError as exc:  # kept in the spool, tried again (retry_due)
                log.error("disposal.failed", file_id=row.id, state=row.state,
                          errno=errno.errorcode.get(exc.errno or 0, str(exc.errno)))  # fmt: skip
                continue
            done.append(row.id)
        if quarantined_as:
            self._journal.record_quarantined_as(quarantined_as)
        if moves and self._archiver is not None:
            self._moving.update(m[0] for m in moves)
            self._archiver.move(moves, folders)
        elif moves:
            self._journal.sync()  # published marks may have been committed without an fsync
            done += archive_all(moves, folders)
        if done:
            self._journal.mark_disposed(done)
        handed = len(moves) if self._archiver is not None else 0  # `collect` tells of those
        kept = len(rows) - len(done) - handed
        if kept or not handed:
            self._note(left_behind=kept > 0)
        return len(rows)

    def collect(self) -> int:
        """Main loop: mark the archiver's finished renames disposed; how many."""
        if self._archiver is None:
            return 0
        done: list[int] = []
        finished = self._archiver.take_finished()
        for handed, moved in finished:
            self._moving.difference_update(handed)
            done += moved
        if done:
            self._journal.mark_disposed(done)
        if finished:
            self._note(left_behind=any(len(moved) < len(handed) for handed, moved in finished))
        return len(done)

    def close(self) -> None:
        """Stop: the renames handed over are finished and marked before the journal closes."""
        if self._archiver is not None:
            self._archiver.close()
            self.collect()

    def _published(self, row: FileRow, pipeline: Pipeline | None) -> tuple[str, str]:
        return published_names(self._paths.state, pipeline, row.name)


def published_names(state: Path, pipeline: Pipeline | None, name: str) -> tuple[str, str]:
    """(quarantine file name, name in the sidecar): the keyed hash unless the pipeline opts
    out with `hash_names = false`."""
    if pipeline is not None and not pipeline.hash_names:
        return name, name
    key = load_name_key(state)
    return hashed_file_name(key, name), hash_name(key, name)


def copies_of(
    paths: PathsConfig, pipelines: Mapping[str, Pipeline], row: FileRow, facts: Facts
) -> list[tuple[str, Path]]:
    """Where the input itself is now (for `trace`): spooled, archived, quarantined or deleted."""
    if row.state == FileState.QUARANTINED:
        name = str(facts.get("quarantined_as") or safe_name(row.name))
        return [("quarantined copy", paths.quarantine / row.pipeline / name)]
    if row.state not in (FileState.PUBLISHED, FileState.DUPLICATE):
        return [("spooled copy", paths.spool / row.spool_name)]
    pipeline = pipelines.get(row.pipeline)
    if row.state == FileState.PUBLISHED and pipeline and pipeline.after_publish == "delete":
        return []
    return [("archived copy", archive_path(paths, row))]

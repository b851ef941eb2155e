"""The kernel side of a claim: pin, check, lease, move, copy and hash one inbox entry (main loop).

The entry is pinned with O_PATH|O_NOFOLLOW (never opened as a file, so a link, FIFO or device is
never followed, read or blocked on), checked on that descriptor, then reopened through
/proc/self/fd (the same inode, so EACCES is a real `permission_denied`). A read lease proves no one
holds it open for writing; a file not ours, or with another name, is copied while hashed, so what
is hashed is exactly what is processed and kept.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import stat
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path
from typing import NamedTuple

import structlog

from daemon.fsutil import sha256_fd
from daemon.intake.refusal import Rules, identity, refusal
from daemon.models import Reason

log = structlog.get_logger()

PRIVATE_MODE = 0o600
_OPEN_INBOX = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
_OPEN_PINNED = os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC
_REOPEN = os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC
_OPEN_SPOOLED = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC
_CREATE_COPY = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
COPY_SUFFIX = ".copy"


class Lease(StrEnum):
    HELD = "held"  # no writer had it open; a new writer now waits for our release
    BUSY = "busy"  # someone holds it open for writing
    UNAVAILABLE = "unavailable"  # not permitted (neither owner nor CAP_LEASE): settle rule


@dataclass(frozen=True, slots=True)
class Refusal:
    reason: Reason
    errno_name: str | None = None
    st: os.stat_result | None = None


@dataclass(frozen=True, slots=True)
class Opened:
    """A readable descriptor on the checked inode, and that inode's stat at the check."""

    fd: int
    st: os.stat_result


# Entries and their outcomes cross the claimer's pipe 500 at a time: tuples, which pickle
# in a fifth of a slotted dataclass's time (2.9 µs a file each way, measured).
class Taken(NamedTuple):
    sha256: str
    size: int


class Entry(NamedTuple):
    """One claim to make, its intent already in the journal."""

    file_id: int
    pipeline: str
    raw_name: str
    spool_path: str
    is_settled: bool  # passed the settle rule (what decides when no lease can be had)


@dataclass(frozen=True, slots=True)
class NotYet:
    """Not taken now, still in the inbox: a writer holds it (`BUSY`), no lease could tell and it
    has not settled (`UNAVAILABLE`), or its inbox folder could not be opened (None)."""

    lease: Lease | None
    inode: int = 0


@dataclass(frozen=True, slots=True)
class Left:
    """Refused where it is (its check, or a rename the folder would not make): reported once."""

    refusal: Refusal


@dataclass(frozen=True, slots=True)
class Spooled:
    """In the spool, but not what was checked (`swapped`), or unreadable there: quarantined."""

    refusal: Refusal
    swapped: bool = False


Outcome = Taken | NotYet | Left | Spooled
StrPath = str | Path


def errno_name(exc: OSError) -> str:
    return errno.errorcode.get(exc.errno or 0, str(exc.errno))


@contextlib.contextmanager
def inbox_fds(inbox: Path, pipelines: set[str], unsafe: set[str]) -> Iterator[dict[str, int]]:
    """A descriptor of each inbox folder, opened without following a symlink: a producer
    who replaces `<inbox>/<pipeline>` by a link to another folder (the state folder, /etc)
    must not make us rename files out of it."""
    fds: dict[str, int] = {}
    try:
        for name in sorted(pipelines):
            try:
                fds[name] = os.open(inbox / name, _OPEN_INBOX)
            except OSError as exc:
                if name not in unsafe:
                    unsafe.add(name)
                    log.error("intake.inbox_unsafe", pipeline=name, errno=errno_name(exc))
                continue
            unsafe.discard(name)
        yield fds
    finally:
        for fd in fds.values():
            os.close(fd)


def open_checked(inbox_fd: int, name: str, pipeline: Rules) -> Opened | Refusal:
    """Pin `name`, check it, and open that very inode for reading."""
    try:
        pinned = os.open(name, _OPEN_PINNED, dir_fd=inbox_fd)
    except FileNotFoundError as exc:
        return Refusal(Reason.VANISHED, errno_name(exc))
    except OSError as exc:
        reason = Reason.PERMISSION_DENIED if exc.errno in (errno.EACCES, errno.EPERM) else None
        return Refusal(reason or Reason.CLAIM_FAILED, errno_name(exc))
    try:
        st = os.fstat(pinned)
        reason = refusal(pipeline, st)
        if reason is not None:
            return Refusal(reason, None, st)
        try:
            fd = os.open(f"/proc/self/fd/{pinned}", _REOPEN)
        except OSError as exc:
            if exc.errno in (errno.EACCES, errno.EPERM):
                return Refusal(Reason.PERMISSION_DENIED, errno_name(exc), st)
            return Refusal(Reason.CLAIM_FAILED, errno_name(exc), st)
        return Opened(fd, st)
    finally:
        os.close(pinned)


def try_lease(fd: int) -> Lease:
    try:
        fcntl.fcntl(fd, fcntl.F_SETLEASE, fcntl.F_RDLCK)
    except OSError as exc:
        return Lease.BUSY if exc.errno in (errno.EAGAIN, errno.EBUSY) else Lease.UNAVAILABLE
    return Lease.HELD


def move_into_spool(
    inbox_fd: int, name: str, target: StrPath, st: os.stat_result
) -> Refusal | None:
    """Rename the entry into the spool; then check that what moved is the inode we checked."""
    try:
        os.rename(name, target, src_dir_fd=inbox_fd)
    except FileNotFoundError as exc:
        return Refusal(Reason.VANISHED, errno_name(exc))
    except OSError as exc:
        return Refusal(Reason.CLAIM_FAILED, errno_name(exc), st)
    return check_moved(target, st)


def check_moved(target: StrPath, st: os.stat_result) -> Refusal | None:
    """A refusal for what now sits at `target` when it is not the checked inode (a swap)."""
    try:
        moved = os.lstat(target)
    except FileNotFoundError as exc:
        return Refusal(Reason.VANISHED, errno_name(exc))
    if stat.S_ISLNK(moved.st_mode):
        return Refusal(Reason.SYMLINK, None, moved)
    if (moved.st_dev, moved.st_ino) != (st.st_dev, st.st_ino):
        return Refusal(Reason.CHANGED_AFTER_CHECK, None, moved)
    return None


def claim_all(
    inbox: Path, entries: Sequence[Entry], pipelines: Mapping[str, Rules], unsafe: set[str]
) -> list[Outcome]:
    """Each entry's outcome, in order (`unsafe`: inbox folders that could not be opened)."""
    service_uid = os.geteuid()
    with inbox_fds(inbox, {e.pipeline for e in entries}, unsafe) as fds:
        return [
            claim_entry(fds[e.pipeline], e, pipelines[e.pipeline], service_uid)
            if e.pipeline in fds
            else NotYet(None)
            for e in entries
        ]


def claim_entry(inbox_fd: int, entry: Entry, pipeline: Rules, service_uid: int) -> Outcome:
    """Pin, check and lease the entry, move it into the spool, then copy or hash it."""
    opened = open_checked(inbox_fd, entry.raw_name, pipeline)
    if isinstance(opened, Refusal):
        return Left(opened)
    try:
        lease = try_lease(opened.fd)
        if lease is Lease.BUSY or (lease is Lease.UNAVAILABLE and not entry.is_settled):
            return NotYet(lease, opened.st.st_ino)
        target = entry.spool_path  # a string: no Path built a file
        moved = move_into_spool(inbox_fd, entry.raw_name, target, opened.st)
        if moved is not None and moved.reason in (Reason.VANISHED, Reason.CLAIM_FAILED):
            return Left(moved)  # still in the inbox (a read-only or sticky folder, a mount point)
        if moved is not None:
            return Spooled(moved, swapped=True)
        taken = take_bytes(opened.fd, opened.st, target, pipeline, service_uid)
        return Spooled(taken) if isinstance(taken, Refusal) else taken
    finally:
        os.close(opened.fd)  # closing the descriptor ends its lease


def finish_lost(entry: Entry, pipeline: Rules) -> Outcome:
    """An entry its claimer died holding (the claimer is gone): finished as recovery finishes
    an interrupted claim. Not in the spool: still in the inbox, looked at again."""
    target = Path(entry.spool_path)
    if not os.path.lexists(target):
        return NotYet(None)
    _copy_path(target).unlink(missing_ok=True)  # half made
    taken = take_spooled(target, pipeline, os.geteuid())
    if isinstance(taken, Refusal):
        return NotYet(None) if taken.reason == Reason.VANISHED else Spooled(taken)
    return taken


def take_bytes(
    fd: int, st: os.stat_result, target: StrPath, pipeline: Rules, service_uid: int
) -> Taken | Refusal:
    """Hash the file at `target` (open as `fd`, checked as `st`). A file owned by someone else or
    with another name is replaced by a private copy made while hashing, so nobody can change
    the bytes we keep; a file that changed while read is refused."""
    must_copy = st.st_uid != service_uid or st.st_nlink > 1
    copy_path = _copy_path(Path(target)) if must_copy else None
    copy_fd = None if copy_path is None else os.open(copy_path, _CREATE_COPY, PRIVATE_MODE)
    try:
        if copy_fd is None:
            os.fchmod(fd, PRIVATE_MODE)
        outcome = _hash_fd(fd, pipeline.max_file_bytes, copy_fd, st.st_size)
        if isinstance(outcome, str):
            return Refusal(outcome)
        if identity(os.fstat(fd)) != identity(st) or outcome.size != st.st_size:
            return Refusal(Reason.CHANGED_AFTER_CHECK)
        if copy_fd is not None and copy_path is not None:
            os.fchmod(copy_fd, PRIVATE_MODE)
            os.fsync(copy_fd)
            os.rename(copy_path, target)  # the copy replaces the producer's inode in the spool
            os.close(copy_fd)
            copy_fd, copy_path = None, None  # nothing left to clean up
        return outcome
    finally:
        if copy_fd is not None:
            os.close(copy_fd)
        if copy_path is not None:
            copy_path.unlink(missing_ok=True)


def _copy_path(target: Path) -> Path:
    """Where a private copy of the spooled `target` is made."""
    return target.with_name(f".{target.name}{COPY_SUFFIX}")


def take_spooled(path: Path, pipeline: Rules, service_uid: int) -> Taken | Refusal:
    """Recovery: an entry already in the spool, never followed, read only if a plain file."""
    try:
        fd = os.open(path, _OPEN_SPOOLED)
    except FileNotFoundError as exc:
        return Refusal(Reason.VANISHED, errno_name(exc))
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            return Refusal(Reason.SYMLINK, errno_name(exc))
        if exc.errno in (errno.EACCES, errno.EPERM):
            return Refusal(Reason.PERMISSION_DENIED, errno_name(exc))
        return Refusal(Reason.CLAIM_FAILED, errno_name(exc))
    try:
        st = os.fstat(fd)
        reason = refusal(pipeline, st)
        if reason is not None:
            return Refusal(reason, None, st)
        return take_bytes(fd, st, path, pipeline, service_uid)
    finally:
        os.close(fd)


def _hash_fd(
    fd: int, max_bytes: int, copy_fd: int | None = None, expected: int | None = None
) -> Taken | Reason:
    """sha256 and size (copying to `copy_fd` on the way), reading at most one chunk past the
    limit (a file still growing)."""
    hashed = sha256_fd(fd, max_bytes, copy_fd, expected)
    return Reason.TOO_LARGE if hashed is None else Taken(*hashed)

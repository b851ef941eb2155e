"""Intake: decide when an inbox file is complete, check it is safe, and claim it into the spool.

Runs on the main loop. Claiming is: journal intent → rename into the spool (relative to an inbox
descriptor opened with O_NOFOLLOW) → open the spooled entry with O_NOFOLLOW|O_NONBLOCK, check the
descriptor → hash it → journal. Nothing in the inbox is ever opened, so a symlink or FIFO there is
never followed or read; whatever is swapped in between the check and the claim is quarantined.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import secrets
import stat
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

import structlog

from daemon.audit import AuditLog
from daemon.audit.events import FileQuarantined, FileReceived, FileRejected
from daemon.config import Pipeline, Settings
from daemon.disposal import quarantine
from daemon.journal import Journal
from daemon.models import IncomingFile
from daemon.outbox import FILE_MODE

log = structlog.get_logger()

# Files claimed per main-loop step: two journal commits each, so batching them keeps the
# fsyncs few, while a bounded chunk keeps the loop responsive to everything else.
CLAIM_CHUNK = 500

IGNORED_SUFFIXES = (".part", ".tmp", ".crdownload", "~")
_SUFFIX_CHARS = frozenset("abcdefghijklmnopqrstuvwxyz0123456789.")
_OPEN_SPOOLED = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC
_OPEN_INBOX = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
_READ_BYTES = 1 << 20


def is_ignored(name: str) -> bool:
    """Hidden and partial names wait until they are renamed (write-then-rename)."""
    return name.startswith(".") or name.endswith(IGNORED_SUFFIXES)


def spool_suffix(name: str) -> str:
    """The input's extension, sanitised: processors detect formats by it."""
    suffix = Path(name).suffix.lower()
    return suffix if 1 < len(suffix) <= 10 and set(suffix) <= _SUFFIX_CHARS else ""


def recorded_name(name: str) -> str:
    """The name as text the journal, manifests and audit log can hold: bytes that are not UTF-8
    (surrogate-escaped by Python) become a literal `\\xNN`. Only ever data, never a path."""
    return os.fsencode(name).decode("utf-8", "backslashreplace")


def kind_of(mode: int) -> str:
    if stat.S_ISLNK(mode):
        return "symlink"
    if stat.S_ISDIR(mode):
        return "directory"
    if stat.S_ISFIFO(mode):
        return "fifo"
    if stat.S_ISSOCK(mode):
        return "socket"
    if stat.S_ISCHR(mode) or stat.S_ISBLK(mode):
        return "device"
    return "not_regular_file"


def refusal(pipeline: Pipeline, st: os.stat_result) -> str | None:
    """Why an entry must not be taken, or None: the same checks on the lstat and on the fd."""
    if not stat.S_ISREG(st.st_mode):
        return kind_of(st.st_mode)
    if st.st_nlink > 1 and not pipeline.allow_hard_links:
        return "hard_link"
    if pipeline.allowed_uids is not None and st.st_uid not in pipeline.allowed_uids:
        return "owner_not_allowed"
    if st.st_size > pipeline.max_file_bytes:
        return "too_large"
    return None


@dataclass
class _Candidate:
    pipeline: str
    path: Path
    signature: tuple[int, int, int]
    stable_since: float
    is_writing: bool = False


@dataclass(frozen=True, slots=True)
class _Plan:
    pipeline: Pipeline
    source: Path
    name: str  # recorded_name(source.name)
    inode: int
    spool_name: str
    received_at: float
    is_suspect_incomplete: bool = False


@dataclass(frozen=True, slots=True)
class _Refused:
    """A claimed entry that turned out not to be a file we may read: quarantined, never read."""

    file_id: int
    pipeline: str
    name: str
    spool_name: str
    reason: str


class Intake:
    def __init__(
        self,
        settings: Settings,
        journal: Journal,
        audit: AuditLog,
        clock: Callable[[], float] = time.time,
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        self._journal = journal
        self._audit = audit
        self._clock = clock
        self._monotonic = monotonic
        self._candidates: dict[Path, _Candidate] = {}
        self._unsafe_inboxes: set[str] = set()
        self.reconfigure(settings)

    def reconfigure(self, settings: Settings) -> None:
        self._settings = settings
        self._pipelines: Mapping[str, Pipeline] = {p.name: p for p in settings.pipeline}
        self._spool = settings.paths.spool
        for name in self._pipelines:
            (self._spool / name).mkdir(parents=True, exist_ok=True, mode=0o750)
        for path in [p for p, c in self._candidates.items() if c.pipeline not in self._pipelines]:
            del self._candidates[path]

    @property
    def pending(self) -> int:
        return len(self._candidates)

    # -- candidates -----------------------------------------------------------------------

    def offer(self, pipeline: str, path: Path, *, is_writing: bool | None = None) -> None:
        """A path seen by an event or a scan. `is_writing` is True after a modify event and
        False after a close event; None (a scan, a create or move) leaves it as it was."""
        if pipeline not in self._pipelines or is_ignored(path.name):
            return
        now = self._monotonic()
        candidate = self._candidates.get(path)
        if candidate is None:
            try:
                st = os.lstat(path)
            except OSError:
                return
            candidate = _Candidate(pipeline, path, _signature(st), now)
            self._candidates[path] = candidate
        elif is_writing:
            candidate.stable_since = now
        if is_writing is not None:
            candidate.is_writing = is_writing

    def scan(self) -> int:
        """Offer every entry of every inbox (start-up and the periodic rescan); count new ones."""
        before = len(self._candidates)
        for name in self._pipelines:
            folder = self._settings.paths.inbox / name
            try:
                entries = list(os.scandir(folder))
            except FileNotFoundError:
                folder.mkdir(parents=True, exist_ok=True)
                continue
            for entry in entries:
                self.offer(name, Path(entry.path))
        return len(self._candidates) - before

    def next_due(self) -> float | None:
        """Monotonic time at which the next candidate may be complete."""
        return min(
            (
                c.stable_since + self._pipelines[c.pipeline].settle_s
                for c in self._candidates.values()
            ),
            default=None,
        )

    def _settled(self, limit: int) -> list[_Candidate]:
        now = self._monotonic()
        ready: list[_Candidate] = []
        for path, c in list(self._candidates.items()):
            if len(ready) >= limit:
                break
            settle_s = self._pipelines[c.pipeline].settle_s
            if now < c.stable_since + settle_s:
                continue
            try:
                st = os.lstat(path)
            except OSError:
                del self._candidates[path]
                continue
            signature = _signature(st)
            if signature != c.signature:
                c.signature, c.stable_since = signature, now
            elif not c.is_writing or now - c.stable_since >= max(
                self._pipelines[c.pipeline].max_incomplete_s, settle_s
            ):
                # A lost close event (inotify overflow) must not hold a file forever either.
                del self._candidates[path]
                ready.append(c)
        return ready

    # -- claiming -------------------------------------------------------------------------

    def take_settled(self, limit: int = CLAIM_CHUNK) -> list[IncomingFile]:
        """Claim settled candidates, at most `limit` (the main loop comes back for the rest, so
        batches seal and start while a large backlog is still being claimed); return the files
        now in the spool and journal."""
        ready = self._settled(limit)
        if not ready:
            return []
        with self._inbox_fds({c.pipeline for c in ready}) as inbox_fds:
            return self._claim(ready, inbox_fds)

    def _claim(self, ready: list[_Candidate], inbox_fds: dict[str, int]) -> list[IncomingFile]:
        now = self._clock()
        plans = [
            p
            for p in (self._plan(c, inbox_fds.get(c.pipeline), now) for c in ready)
            if p is not None
        ]
        if not plans:
            return []
        ids = self._journal.begin_claims(
            (p.pipeline.name, p.name, p.spool_name, p.received_at) for p in plans
        )
        received, dropped, refused, taken = [], [], [], []
        for file_id, plan in zip(ids, plans, strict=True):
            outcome = self._move_and_hash(plan, inbox_fds[plan.pipeline.name])
            if outcome is None:
                dropped.append(file_id)
            elif isinstance(outcome, str):
                refused.append(
                    _Refused(file_id, plan.pipeline.name, plan.name, plan.spool_name, outcome)
                )
            else:
                sha256, size = outcome
                received.append((file_id, sha256, size))
                taken.append(
                    IncomingFile(
                        file_id,
                        plan.pipeline.name,
                        plan.name,
                        self._spool / plan.spool_name,
                        sha256,
                        size,
                        plan.received_at,
                        plan.is_suspect_incomplete,
                    )
                )
        self._journal.finish_claims(
            received, dropped, [(r.file_id, "", 0, r.reason) for r in refused]
        )
        for f in taken:
            self._audit.record(
                FileReceived(
                    pipeline=f.pipeline,
                    file=f.name,
                    sha256=f.sha256,
                    size=f.size,
                    file_id=f.file_id,
                )
            )
        self._quarantine_refused(refused)
        return taken

    def adopt_orphans(self) -> int:
        """Recovery: spooled files the journal does not know (a journal restored from a backup,
        a write lost with the disk) become claims again, under their spool name since the
        original name is gone: never left behind, never deleted."""
        known = self._journal.spool_names()
        orphans = []
        for pipeline in self._pipelines:
            folder = self._spool / pipeline
            for entry in os.scandir(folder) if folder.is_dir() else ():
                spool_name = f"{pipeline}/{entry.name}"
                if spool_name not in known and not entry.name.startswith("."):
                    mtime = entry.stat(follow_symlinks=False).st_mtime
                    orphans.append((pipeline, entry.name, spool_name, mtime))
        if orphans:
            self._journal.begin_claims(orphans)
            log.warning("intake.orphans_adopted", files=len(orphans))
        return len(orphans)

    def finish_interrupted_claims(self) -> list[IncomingFile]:
        """Recovery: claims whose journal intent was written but not their outcome."""
        received, dropped, refused, taken = [], [], [], []
        for row in self._journal.claiming():
            spooled = self._spool / row.spool_name
            if row.pipeline not in self._pipelines or not os.path.lexists(spooled):
                dropped.append(row.id)
                continue
            pipeline = self._pipelines[row.pipeline]
            plan = _Plan(pipeline, Path(), row.name, 0, row.spool_name, row.received_at)
            outcome = self._hash_spooled(plan)
            if isinstance(outcome, str):
                refused.append(_Refused(row.id, row.pipeline, row.name, row.spool_name, outcome))
            elif outcome is not None:
                received.append((row.id, *outcome))
                taken.append(
                    IncomingFile(
                        row.id,
                        row.pipeline,
                        row.name,
                        spooled,
                        *outcome,
                        row.received_at,
                    )
                )
        if received or dropped or refused:
            self._journal.finish_claims(
                received, dropped, [(r.file_id, "", 0, r.reason) for r in refused]
            )
        self._quarantine_refused(refused)
        return taken

    @contextlib.contextmanager
    def _inbox_fds(self, pipelines: set[str]) -> Iterator[dict[str, int]]:
        """A descriptor of each inbox folder, opened without following a symlink: a producer
        who replaces `<inbox>/<pipeline>` by a link to another folder (the state folder, /etc)
        must not make us rename files out of it."""
        fds: dict[str, int] = {}
        try:
            for name in sorted(pipelines):
                try:
                    fds[name] = os.open(self._settings.paths.inbox / name, _OPEN_INBOX)
                except OSError as exc:
                    if name not in self._unsafe_inboxes:
                        self._unsafe_inboxes.add(name)
                        log.error("intake.inbox_unsafe", pipeline=name, errno=exc.errno)
                    continue
                self._unsafe_inboxes.discard(name)
            yield fds
        finally:
            for fd in fds.values():
                os.close(fd)

    def _plan(self, c: _Candidate, inbox_fd: int | None, now: float) -> _Plan | None:
        pipeline = self._pipelines[c.pipeline]
        if inbox_fd is None:
            return None
        try:
            st = os.lstat(c.path.name, dir_fd=inbox_fd)
        except OSError:
            return None
        name = recorded_name(c.path.name)
        reason = refusal(pipeline, st)
        if reason is not None:
            self._reject(pipeline.name, name, st.st_ino, reason, size=st.st_size)
            return None
        spool_name = f"{pipeline.name}/{time.time_ns():x}-{secrets.token_hex(4)}"
        return _Plan(
            pipeline,
            c.path,
            name,
            st.st_ino,
            spool_name + spool_suffix(c.path.name),
            now,
            c.is_writing,
        )

    def _reject(self, pipeline: str, name: str, inode: int, reason: str, size: int) -> None:
        """Leave the entry alone (never opened, never followed) and report it once."""
        if self._journal.record_rejected(pipeline, name, inode, reason, self._clock()):
            self._audit.record(FileRejected(pipeline=pipeline, file=name, reason=reason, size=size))
            log.warning("file.rejected", pipeline=pipeline, reason=reason, inode=inode)

    def _move_and_hash(self, plan: _Plan, inbox_fd: int) -> tuple[str, int] | str | None:
        try:
            os.rename(plan.source.name, self._spool / plan.spool_name, src_dir_fd=inbox_fd)
        except FileNotFoundError:
            return None
        except OSError as exc:
            # Left in the inbox (a read-only or sticky folder, a mount point): reported once.
            # The message would quote the path, so only the errno is kept.
            self._reject(plan.pipeline.name, plan.name, plan.inode, "claim_failed", size=0)
            log.warning("intake.claim_failed", pipeline=plan.pipeline.name, errno=exc.errno)
            return None
        return self._hash_spooled(plan)

    def _hash_spooled(self, plan: _Plan) -> tuple[str, int] | str | None:
        """Hash the spooled entry through a descriptor that cannot be a link, FIFO or device.

        Between our lstat and the rename, someone could swap in another object: the spooled
        entry is then refused (and quarantined), never followed or read. The checks are the
        lstat's, repeated on the descriptor.
        """
        path = self._spool / plan.spool_name
        try:
            fd = os.open(path, _OPEN_SPOOLED)
        except FileNotFoundError:
            return None
        except OSError:
            return "symlink"  # ELOOP: O_NOFOLLOW met a link
        try:
            st = os.fstat(fd)
            reason = refusal(plan.pipeline, st)
            if reason is not None:
                return reason
            if st.st_nlink == 1:
                # Our copy from now on: never keep the producer's mode (world-readable, say).
                # Not ours to change when owned by another user (EPERM): the private state
                # folder is what keeps it unreadable then.
                with contextlib.suppress(PermissionError):
                    os.fchmod(fd, FILE_MODE)
            return _hash_fd(fd, plan.pipeline.max_file_bytes)
        finally:
            os.close(fd)

    def _quarantine_refused(self, refused: list[_Refused]) -> None:
        """Audit, then move each refused entry to quarantine at once (a rename: still never
        opened). A failed move is left to the supervisor's disposal, which retries."""
        disposed = []
        for r in refused:
            self._audit.record(
                FileQuarantined(
                    pipeline=r.pipeline, file=r.name, file_id=r.file_id, reason=r.reason
                )
            )
            log.warning("file.quarantined", pipeline=r.pipeline, file_id=r.file_id, reason=r.reason)
            sidecar = {
                "name": r.name,
                "pipeline": r.pipeline,
                "reason": r.reason,
                "detail": "refused when claimed (it changed after it was checked); never read",
                "sha256": "",
                "size": 0,
                "batch_id": None,
                "quarantined_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            }
            target = self._settings.paths.quarantine / r.pipeline
            try:
                quarantine(self._spool / r.spool_name, target, r.name, sidecar)
            except FileNotFoundError:
                pass
            except OSError as exc:
                log.error("intake.quarantine_failed", file_id=r.file_id, errno=exc.errno)
                continue
            disposed.append(r.file_id)
        if disposed:
            self._journal.mark_disposed(disposed)


def _hash_fd(fd: int, max_bytes: int) -> tuple[str, int] | str:
    """sha256 and size, reading at most one chunk past the limit (a file still growing)."""
    digest = hashlib.sha256()
    size = 0
    while chunk := os.read(fd, _READ_BYTES):
        digest.update(chunk)
        size += len(chunk)
        if size > max_bytes:
            return "too_large"
    return digest.hexdigest(), size


def _signature(st: os.stat_result) -> tuple[int, int, int]:
    return (st.st_ino, st.st_size, st.st_mtime_ns)

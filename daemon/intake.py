"""Intake: decide when an inbox file is complete, check it is safe, and claim it into the spool.

Runs on the main loop. Claiming is: journal intent → rename into the spool → open the spooled
entry with O_NOFOLLOW|O_NONBLOCK, check the descriptor is a regular file, hash it → journal.
Nothing is ever opened in the inbox itself, so a symlink or FIFO there is never followed or read.
"""

from __future__ import annotations

import hashlib
import os
import secrets
import stat
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

import structlog

from daemon.audit import AuditEvent, AuditLog
from daemon.config import Pipeline, Settings
from daemon.journal import Journal
from daemon.models import IncomingFile

log = structlog.get_logger()

IGNORED_SUFFIXES = (".part", ".tmp", ".crdownload", "~")
_SUFFIX_CHARS = frozenset("abcdefghijklmnopqrstuvwxyz0123456789.")


def is_ignored(name: str) -> bool:
    """Hidden and partial names wait until they are renamed (write-then-rename)."""
    return name.startswith(".") or name.endswith(IGNORED_SUFFIXES)


def spool_suffix(name: str) -> str:
    """The input's extension, sanitised: processors detect formats by it."""
    suffix = Path(name).suffix.lower()
    return suffix if 1 < len(suffix) <= 10 and set(suffix) <= _SUFFIX_CHARS else ""


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
    spool_name: str
    received_at: float
    is_suspect_incomplete: bool = False


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

    def _settled(self) -> list[_Candidate]:
        now = self._monotonic()
        ready = []
        for path, c in list(self._candidates.items()):
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

    def take_settled(self) -> list[IncomingFile]:
        """Claim every settled candidate; return the files now in the spool and journal."""
        ready = self._settled()
        if not ready:
            return []
        now = self._clock()
        plans = [p for p in (self._plan(c, now) for c in ready) if p is not None]
        if not plans:
            return []
        ids = self._journal.begin_claims(
            (p.pipeline.name, p.source.name, p.spool_name, p.received_at) for p in plans
        )
        received, dropped, refused, taken = [], [], [], []
        for file_id, plan in zip(ids, plans, strict=True):
            outcome = self._move_and_hash(plan)
            if outcome is None:
                dropped.append(file_id)
            elif isinstance(outcome, str):
                refused.append((file_id, "", 0, outcome))
            else:
                sha256, size = outcome
                received.append((file_id, sha256, size))
                taken.append(
                    IncomingFile(
                        file_id,
                        plan.pipeline.name,
                        plan.source.name,
                        self._spool / plan.spool_name,
                        sha256,
                        size,
                        plan.received_at,
                        plan.is_suspect_incomplete,
                    )
                )
        self._journal.finish_claims(received, dropped, refused)
        for f in taken:
            self._audit.append(
                AuditEvent.FILE_RECEIVED,
                pipeline=f.pipeline,
                file=f.name,
                sha256=f.sha256,
                size=f.size,
                file_id=f.file_id,
            )
        for file_id, _, _, reason in refused:
            self._audit.append(AuditEvent.FILE_QUARANTINED, file_id=file_id, reason=reason)
        return taken

    def finish_interrupted_claims(self) -> list[IncomingFile]:
        """Recovery: claims whose journal intent was written but not their outcome."""
        received, dropped, refused, taken = [], [], [], []
        for row in self._journal.claiming():
            if row.pipeline not in self._pipelines or not (self._spool / row.spool_name).exists():
                dropped.append(row.id)
                continue
            plan = _Plan(self._pipelines[row.pipeline], Path(), row.spool_name, row.received_at)
            outcome = self._hash_spooled(plan)
            if isinstance(outcome, str):
                refused.append((row.id, "", 0, outcome))
            elif outcome is not None:
                received.append((row.id, *outcome))
                taken.append(
                    IncomingFile(
                        row.id,
                        row.pipeline,
                        row.name,
                        self._spool / row.spool_name,
                        *outcome,
                        row.received_at,
                    )
                )
        if received or dropped or refused:
            self._journal.finish_claims(received, dropped, refused)
        return taken

    def _plan(self, c: _Candidate, now: float) -> _Plan | None:
        pipeline = self._pipelines[c.pipeline]
        try:
            st = os.lstat(c.path)
        except OSError:
            return None
        reason = None
        if not stat.S_ISREG(st.st_mode):
            reason = kind_of(st.st_mode)
        elif st.st_nlink > 1:
            reason = "hard_link"
        elif st.st_size > pipeline.max_file_bytes:
            reason = "too_large"
        if reason is not None:
            self._reject(pipeline.name, c.path.name, st.st_ino, reason, size=st.st_size)
            return None
        spool_name = f"{pipeline.name}/{time.time_ns():x}-{secrets.token_hex(4)}"
        return _Plan(pipeline, c.path, spool_name + spool_suffix(c.path.name), now, c.is_writing)

    def _reject(self, pipeline: str, name: str, inode: int, reason: str, size: int) -> None:
        """Leave the entry alone (never opened, never followed) and report it once."""
        if self._journal.record_rejected(pipeline, name, inode, reason, self._clock()):
            self._audit.append(
                AuditEvent.FILE_REJECTED, pipeline=pipeline, file=name, reason=reason, size=size
            )
            log.warning("file.rejected", pipeline=pipeline, reason=reason)

    def _move_and_hash(self, plan: _Plan) -> tuple[str, int] | str | None:
        try:
            os.rename(plan.source, self._spool / plan.spool_name)
        except FileNotFoundError:
            return None
        return self._hash_spooled(plan)

    def _hash_spooled(self, plan: _Plan) -> tuple[str, int] | str | None:
        """Hash the spooled entry through a descriptor that cannot be a link, FIFO or device.

        Between our lstat and the rename, someone could swap in another object: the spooled
        entry is then refused (and later quarantined), never followed or read.
        """
        path = self._spool / plan.spool_name
        try:
            fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
        except FileNotFoundError:
            return None
        except OSError:
            return "symlink"
        try:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode):
                return kind_of(st.st_mode)
            if st.st_size > plan.pipeline.max_file_bytes:
                return "too_large"
            digest = hashlib.sha256()
            size = 0
            while chunk := os.read(fd, 1 << 20):
                digest.update(chunk)
                size += len(chunk)
            return digest.hexdigest(), size
        finally:
            os.close(fd)


def _signature(st: os.stat_result) -> tuple[int, int, int]:
    return (st.st_ino, st.st_size, st.st_mtime_ns)

"""The hash-chained writer of `<outbox>/_audit/`: main process only, owned by the main loop.

Pipelines whose file names may carry patient identity get a keyed hash in `file` instead.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from types import TracebackType

import structlog

from daemon.audit.events import REBUILT_EVENTS, AuditEvent, AuditRecovered, Record
from daemon.audit.names import hash_name
from daemon.audit.tail import parse_head, read_last_line, truncate
from daemon.audit.verify import (
    CHAIN_HMAC,
    FUTURE_SKEW_S,
    GENESIS_HASH,
    canonical,
    log_files,
    text_hash,
)
from daemon.errors import MedbatchError
from daemon.fsutil import fsync_dir, iso_utc_ms, write_all
from daemon.models import Reason

log = structlog.get_logger()

AuditListener = Callable[[Record], None]

_RESERVED_FIELDS = frozenset({"ts", "seq", "event", "prev", "hash", "chain"})
# The main loop's per-step sync waits until its oldest unsynced line is this old: one fsync
# (and one of the journal) for a second of a backlog's lines. Only lines `reconcile` rebuilds
# from the journal wait (REBUILT_EVENTS): a power cut loses none for good. Any other is synced
# by the step that wrote it. (0.25 s: 43 fsyncs of the main thread per 20,000-file backlog;
# 1 s: 29, bench/NOTES.md round 12.)
SYNC_LAG_S = 1.0


class AuditLogCorruptError(MedbatchError):
    """The last complete line of the audit log is unreadable; refusing to continue its chain."""


class AuditLog:
    """Appends hash-chained lines to `audit-YYYY-MM-DD.jsonl` (UTC date of each line's ts).

    `append` hands each line to the OS in one write (no fsync); `sync` makes them durable. Record
    `head` in the journal only after `sync` returned. Not thread-safe: one owner.

    A line whose `pipeline` is in `hashed_pipelines` carries `hash_name(name_key, file)` in
    `file` instead of the name: file names are the one place patient identity can slip in.
    With `chain_key`, each line is marked `"chain": "hmac-sha256"` and chained with an HMAC, so
    whoever can write the folder but not read the key cannot append or re-chain lines.
    """

    def __init__(
        self,
        folder: Path,
        clock: Callable[[], float] = time.time,
        *,
        hashed_pipelines: frozenset[str] = frozenset(),
        name_key: bytes | None = None,
        chain_key: bytes | None = None,
    ) -> None:
        self._folder = folder
        self._clock = clock
        self._chain_key = chain_key
        self._name_key = name_key
        self._listeners: list[AuditListener] = []
        self.set_hashed_pipelines(hashed_pipelines, name_key)
        self._seq = 0
        self._hash = GENESIS_HASH
        self._last_ms = 0
        self._fd: int | None = None
        self._day = ""
        self._offset = 0
        self._synced_offset = 0
        self._unsynced: list[bytes] = []
        self._is_tail_dirty = False
        self._is_dir_dirty = False
        self._barrier: Callable[[], None] | None = None
        self._unsynced_since: float | None = None  # monotonic time of the oldest unsynced line
        self._is_sync_urgent = False  # an unsynced line the journal could not rebuild
        if not folder.is_dir():
            folder.mkdir(mode=0o750, parents=True, exist_ok=True)
            fsync_dir(folder.parent)
        for name, torn_bytes in self._load_head():
            self.record(AuditRecovered(file=name, torn_bytes=torn_bytes))
        self.sync()

    @property
    def folder(self) -> Path:
        return self._folder

    @property
    def head(self) -> tuple[int, str]:
        return self._seq, self._hash

    def set_barrier(self, barrier: Callable[[], None]) -> None:
        """`barrier()` runs before each fsync of the log: the service passes the journal's
        sync, so that no line is durable before the transition it records is."""
        self._barrier = barrier

    def add_listener(self, listener: AuditListener) -> None:
        """Call `listener(event)` after each recorded event is written (metrics count them)."""
        self._listeners.append(listener)

    def set_hashed_pipelines(
        self, pipelines: frozenset[str], name_key: bytes | None = None
    ) -> None:
        """Which pipelines' file names are hashed from now on (a reload may change it)."""
        if name_key is not None:
            self._name_key = name_key
        if pipelines and self._name_key is None:
            raise ValueError("hashed_pipelines needs a name_key")
        self._hashed_pipelines = frozenset(pipelines)

    def append(self, event: AuditEvent, **fields: object) -> dict[str, object]:
        """Write one line; on OSError the file and `head` stay as they were (retry later)."""
        line, data, now_ms = self._line(event, fields, self._seq, self._hash, self._last_ms)
        self._write_lines([(line, data, now_ms)])
        return line

    def _line(
        self, event: AuditEvent, fields: dict[str, object], seq: int, prev: str, last_ms: int
    ) -> tuple[dict[str, object], bytes, int]:
        """The line after (seq, prev) as a dict and as the bytes written, and its time."""
        clash = _RESERVED_FIELDS.intersection(fields)
        if clash:
            raise ValueError(f"reserved audit field(s): {', '.join(sorted(clash))}")
        name = fields.get("file")
        if isinstance(name, str) and fields.get("pipeline") in self._hashed_pipelines:
            assert self._name_key is not None
            fields["file"] = hash_name(self._name_key, name)
        # A wall clock stepped back must neither reorder lines nor send one to an older day's file.
        now_ms = max(int(self._clock() * 1000), last_ms)
        ts, event_name = iso_utc_ms(now_ms), AuditEvent(event).value
        line: dict[str, object] = {"ts": ts, "seq": seq + 1, "event": event_name}
        line.update((key, value) for key, value in fields.items() if value is not None)
        if self._chain_key is not None:
            line["chain"] = CHAIN_HMAC
        line["prev"] = prev
        # Serialised once: the hash covers the canonical text, and the line on disk is that
        # text with the hash added last (verify re-derives the canonical form from the fields).
        text = canonical(line)
        digest = text_hash(prev, text, self._chain_key, self._chain_key is not None)
        line["hash"] = digest
        return line, f'{text[:-1]},"hash":"{digest}"}}\n'.encode("ascii"), now_ms

    def _write_lines(self, lines: list[tuple[dict[str, object], bytes, int]]) -> None:
        """Write chained lines, one write per UTC day they fall on; `head` follows each write."""
        start = 0
        while start < len(lines):
            day = str(lines[start][0]["ts"])[:10]
            end = start + 1
            while end < len(lines) and str(lines[end][0]["ts"]).startswith(day):
                end += 1
            if day != self._day:
                self._open_day(day)
            self._write(b"".join(data for _, data, _ in lines[start:end]))
            if not self._is_sync_urgent:
                self._is_sync_urgent = any(
                    line["event"] not in REBUILT_EVENTS for line, _, _ in lines[start:end]
                )
            line, _, now_ms = lines[end - 1]
            self._seq, self._hash, self._last_ms = (
                self._seq + end - start,
                str(line["hash"]),
                now_ms,
            )
            start = end

    def record(self, event: Record, *, recovered: bool = False) -> dict[str, object]:
        """Write one typed event (`recovered`: rebuilt from the journal); tell the listeners."""
        line = self.append(event.event, recovered=recovered or None, **event.payload())
        if line:
            self._tell(event)
        return line

    def record_many(self, events: Sequence[Record]) -> None:
        """`record` each event, in one write (a claim group's `file.received` lines): the same
        lines, chained alike; on OSError none is written past the day that failed."""
        lines = []
        seq, prev, last_ms = self._seq, self._hash, self._last_ms
        for event in events:
            line, data, last_ms = self._line(event.event, event.payload(), seq, prev, last_ms)
            lines.append((line, data, last_ms))
            seq, prev = seq + 1, str(line["hash"])
        self._write_lines(lines)
        for event in events:
            self._tell(event)

    def _tell(self, event: Record) -> None:
        for listener in self._listeners:
            try:
                listener(event)
            except Exception:
                # The line is written; a listener's bug must not look like a failed write.
                log.exception("audit.listener_failed", listener=repr(listener))

    def sync(self) -> None:
        """Make every appended line durable; an error is raised, never swallowed (caller pauses)."""
        if self._fd is None:
            return
        if self._synced_offset == self._offset and not (self._is_tail_dirty or self._is_dir_dirty):
            return  # nothing new: an idle service must not fsync on every tick
        if self._barrier is not None:
            self._barrier()
        try:
            if self._is_tail_dirty:
                self._restore_tail(self._fd)
            os.fsync(self._fd)
            if self._is_dir_dirty:
                fsync_dir(self._folder)
        except OSError:
            # After a failed fsync Linux may drop the dirty pages and report success next time
            # (https://wiki.postgresql.org/wiki/Fsync_Errors): write them again from memory.
            self._is_tail_dirty = True
            raise
        self._is_dir_dirty = False
        self._synced_offset = self._offset
        self._unsynced.clear()
        self._unsynced_since = None
        self._is_sync_urgent = False

    def sync_due(self) -> None:
        """`sync`, once the oldest unsynced line is SYNC_LAG_S old, at once if one is not in
        REBUILT_EVENTS (or a sync failed before)."""
        since = self._unsynced_since
        waits = since is not None and time.monotonic() - since < SYNC_LAG_S
        if not waits or self._is_sync_urgent or self._is_tail_dirty:
            self.sync()

    def close(self) -> None:
        """Sync, then release the file (also when the sync fails)."""
        if self._fd is None:
            return
        try:
            self.sync()
        finally:
            os.close(self._fd)
            self._fd, self._day = None, ""

    def __enter__(self) -> AuditLog:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.close()

    def _load_head(self) -> list[tuple[str, int]]:
        """Continue the chain from the newest complete line; cut off torn tails (never synced)."""
        torn: list[tuple[str, int]] = []
        for path in reversed(log_files(self._folder)):
            raw, torn_bytes = read_last_line(path)
            if torn_bytes:
                truncate(path, path.stat().st_size - torn_bytes)
                torn.append((path.name, torn_bytes))
            if raw is not None:
                try:
                    self._seq, self._hash, last_ms = parse_head(raw)
                except (ValueError, KeyError, TypeError) as exc:
                    raise AuditLogCorruptError(
                        f"{path.name}: last line is not an audit line ({exc}); "
                        "run `medbatch audit verify`"
                    ) from exc
                # A forged future-dated last line must not drag every later line's date along.
                self._last_ms = min(last_ms, int((self._clock() + FUTURE_SKEW_S) * 1000))
                break
        return torn

    def _open_day(self, day: str) -> None:
        if self._fd is not None:
            # Make the finished day durable before leaving it, so one sync covers one file.
            self.sync()
            os.close(self._fd)
            self._fd, self._day = None, ""
        path = self._folder / f"audit-{day}.jsonl"
        is_new = not path.exists()
        flags = os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC
        self._fd = os.open(path, flags, 0o640)
        self._day = day
        self._offset = self._synced_offset = os.fstat(self._fd).st_size
        self._is_dir_dirty = self._is_dir_dirty or is_new

    def _write(self, data: bytes) -> None:
        assert self._fd is not None
        try:
            if self._is_tail_dirty:
                self._restore_tail(self._fd)
            write_all(self._fd, data)
        except OSError:
            try:
                os.ftruncate(self._fd, self._offset)
            except OSError:
                self._is_tail_dirty = True
            raise
        self._offset += len(data)
        self._unsynced.append(data)
        if self._unsynced_since is None:
            self._unsynced_since = time.monotonic()

    def _restore_tail(self, fd: int) -> None:
        """Rewrite everything since the last good sync, so the file is exactly synced + unsynced."""
        os.ftruncate(fd, self._synced_offset)
        for data in self._unsynced:
            write_all(fd, data)
        self._is_tail_dirty = False


class TolerantAuditLog(AuditLog):
    """The service's audit log: a write the disk refuses never stops the service.

    The refused line is dropped (the file and `head` stay as they were) and `failing_since`
    set; the service then pauses, and once `recover()` can write again it rebuilds the missing
    lines from the journal, which is the truth (daemon/audit/reconcile.py).
    """

    failing_since: float | None = None

    def append(self, event: AuditEvent, **fields: object) -> dict[str, object]:
        if self.failing_since is not None:
            return {}
        try:
            return super().append(event, **fields)
        except OSError as exc:
            self._fail(exc)
            return {}

    def record_many(self, events: Sequence[Record]) -> None:
        if self.failing_since is not None:
            return
        try:
            super().record_many(events)
        except OSError as exc:
            self._fail(exc)

    def sync(self) -> None:
        if self.failing_since is None:
            try:
                super().sync()
            except OSError as exc:
                self._fail(exc)

    def recover(self) -> float | None:
        """Try the disk again; when a line is written and synced, return when failing began."""
        since = self.failing_since
        if since is None:
            return None
        self.failing_since = None
        self.record(AuditRecovered(reason=Reason.AUDIT_UNWRITABLE))
        self.sync()
        if self.failing_since is not None:
            self.failing_since = since
            return None
        return since

    def _fail(self, exc: OSError) -> None:
        if self.failing_since is None:
            self.failing_since = time.time()
            log.error("audit.unwritable", errno=exc.errno)

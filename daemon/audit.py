"""The audit vocabulary, the hash-chained writer of `<outbox>/_audit/` and its verifier.

Runs in the main process only: `AuditLog` is the single writer, owned by the main loop.
Pipelines whose file names may carry patient identity get a keyed hash in `file` instead.
"""

from __future__ import annotations

import enum
import hashlib
import hmac
import json
import os
import re
import secrets
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from types import TracebackType

import structlog

from daemon.errors import MedbatchError

log = structlog.get_logger()

AuditListener = Callable[[dict[str, object]], None]

GENESIS_HASH = "0" * 64
NAME_KEY_FILE = "audit-name.key"
NAME_KEY_BYTES = 32
NAME_HASH_PREFIX = "hmac-sha256:"
_FILE_NAME = re.compile(r"audit-(\d{4}-\d{2}-\d{2})\.jsonl")
_RESERVED_FIELDS = frozenset({"ts", "seq", "event", "prev", "hash"})
_TAIL_CHUNK_BYTES = 64 * 1024


class AuditEvent(enum.StrEnum):
    DAEMON_STARTED = "daemon.started"
    DAEMON_STOPPED = "daemon.stopped"
    DAEMON_RECOVERED = "daemon.recovered"
    DAEMON_DRAINING = "daemon.draining"
    FILE_RECEIVED = "file.received"
    FILE_REJECTED = "file.rejected"
    FILE_QUARANTINED = "file.quarantined"
    FILE_DUPLICATE = "file.duplicate"
    FILE_ARCHIVED = "file.archived"
    BATCH_SEALED = "batch.sealed"
    BATCH_STARTED = "batch.started"
    BATCH_PUBLISHED = "batch.published"
    BATCH_FAILED = "batch.failed"
    BATCH_RETRIED = "batch.retried"
    BATCH_SPLIT = "batch.split"
    CONFIG_RELOADED = "config.reloaded"
    CONFIG_REJECTED = "config.rejected"
    INTAKE_PAUSED = "intake.paused"
    INTAKE_RESUMED = "intake.resumed"
    AUDIT_RECOVERED = "audit.recovered"


class AuditLogCorruptError(MedbatchError):
    """The last complete line of the audit log is unreadable; refusing to continue its chain."""


class NameKeyError(MedbatchError):
    """The audit name key is unreadable or not 32 bytes; refusing to hash names with another."""


@dataclass(frozen=True)
class VerifyReport:
    ok: bool
    lines: int
    files: int
    error: str | None = None
    torn_tail: bool = False


class AuditLog:
    """Appends hash-chained lines to `audit-YYYY-MM-DD.jsonl` (UTC date of each line's ts).

    `append` hands each line to the OS in one write (no fsync); `sync` makes them durable. Record
    `head` in the journal only after `sync` returned. Not thread-safe: one owner.

    A line whose `pipeline` is in `hashed_pipelines` carries `hash_name(name_key, file)` in
    `file` instead of the name: file names are the one place patient identity can slip in.
    """

    def __init__(
        self,
        folder: Path,
        clock: Callable[[], float] = time.time,
        *,
        hashed_pipelines: frozenset[str] = frozenset(),
        name_key: bytes | None = None,
    ) -> None:
        self._folder = folder
        self._clock = clock
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
        if not folder.is_dir():
            folder.mkdir(mode=0o750, parents=True, exist_ok=True)
            _fsync_dir(folder.parent)
        for name, torn_bytes in self._load_head():
            self.append(AuditEvent.AUDIT_RECOVERED, file=name, torn_bytes=torn_bytes)
        self.sync()

    @property
    def head(self) -> tuple[int, str]:
        return self._seq, self._hash

    def add_listener(self, listener: AuditListener) -> None:
        """Call `listener(line)` after each line is written (metrics count audit events)."""
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
        clash = _RESERVED_FIELDS.intersection(fields)
        if clash:
            raise ValueError(f"reserved audit field(s): {', '.join(sorted(clash))}")
        name = fields.get("file")
        if isinstance(name, str) and fields.get("pipeline") in self._hashed_pipelines:
            assert self._name_key is not None
            fields["file"] = hash_name(self._name_key, name)
        # A wall clock stepped back must neither reorder lines nor send one to an older day's file.
        now_ms = max(int(self._clock() * 1000), self._last_ms)
        ts = _format_ts(now_ms)
        seq = self._seq + 1
        line: dict[str, object] = {"ts": ts, "seq": seq, "event": AuditEvent(event).value}
        line.update((key, value) for key, value in fields.items() if value is not None)
        line["prev"] = self._hash
        digest = _line_hash(self._hash, line)
        line["hash"] = digest
        data = (_canonical(line) + "\n").encode("ascii")
        if ts[:10] != self._day:
            self._open_day(ts[:10])
        self._write(data)
        self._seq, self._hash, self._last_ms = seq, digest, now_ms
        for listener in self._listeners:
            try:
                listener(line)
            except Exception:
                # The line is written; a listener's bug must not look like a failed write.
                log.exception("audit.listener_failed", listener=repr(listener))
        return line

    def sync(self) -> None:
        """Make every appended line durable; an error is raised, never swallowed (caller pauses)."""
        if self._fd is None:
            return
        if self._synced_offset == self._offset and not (self._is_tail_dirty or self._is_dir_dirty):
            return  # nothing new: an idle service must not fsync on every tick
        try:
            if self._is_tail_dirty:
                self._restore_tail(self._fd)
            os.fsync(self._fd)
            if self._is_dir_dirty:
                _fsync_dir(self._folder)
        except OSError:
            # After a failed fsync Linux may drop the dirty pages and report success next time
            # (https://wiki.postgresql.org/wiki/Fsync_Errors): write them again from memory.
            self._is_tail_dirty = True
            raise
        self._is_dir_dirty = False
        self._synced_offset = self._offset
        self._unsynced.clear()

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
        for path in reversed(_log_files(self._folder)):
            raw, torn_bytes = _read_last_line(path)
            if torn_bytes:
                _truncate(path, path.stat().st_size - torn_bytes)
                torn.append((path.name, torn_bytes))
            if raw is not None:
                try:
                    self._seq, self._hash, self._last_ms = _parse_head(raw)
                except (ValueError, KeyError, TypeError) as exc:
                    raise AuditLogCorruptError(
                        f"{path.name}: last line is not an audit line ({exc}); "
                        "run `medbatch audit verify`"
                    ) from exc
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
            _write_all(self._fd, data)
        except OSError:
            try:
                os.ftruncate(self._fd, self._offset)
            except OSError:
                self._is_tail_dirty = True
            raise
        self._offset += len(data)
        self._unsynced.append(data)

    def _restore_tail(self, fd: int) -> None:
        """Rewrite everything since the last good sync, so the file is exactly synced + unsynced."""
        os.ftruncate(fd, self._synced_offset)
        for data in self._unsynced:
            _write_all(fd, data)
        self._is_tail_dirty = False


def hash_name(key: bytes, name: str) -> str:
    """The keyed hash written instead of a file name: stable for one key, useless without it."""
    raw = name.encode("utf-8", "surrogateescape")
    return NAME_HASH_PREFIX + hmac.new(key, raw, hashlib.sha256).hexdigest()[:32]


def load_name_key(state: Path) -> bytes:
    """`<state>/audit-name.key`, created (32 random bytes, mode 0600) on first use."""
    path = state / NAME_KEY_FILE
    key = read_name_key(state)
    if key is not None:
        return key
    state.mkdir(parents=True, exist_ok=True, mode=0o750)
    tmp = state / f".{NAME_KEY_FILE}.{secrets.token_hex(4)}"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC | os.O_NOFOLLOW, 0o600)
    try:
        _write_all(fd, secrets.token_bytes(NAME_KEY_BYTES))
        os.fsync(fd)
    finally:
        os.close(fd)
    try:
        # link() never replaces: if another process created the key meanwhile, theirs wins.
        os.link(tmp, path)
        _fsync_dir(state)
    except FileExistsError:
        pass
    finally:
        tmp.unlink()
    key = read_name_key(state)
    assert key is not None
    return key


def read_name_key(state: Path) -> bytes | None:
    """The name key if it exists (None if not); NameKeyError if it is not 32 bytes."""
    path = state / NAME_KEY_FILE
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW)
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise NameKeyError(f"cannot read {path}: {exc.strerror}") from None
    try:
        key = os.read(fd, NAME_KEY_BYTES + 1)
    finally:
        os.close(fd)
    if len(key) != NAME_KEY_BYTES:
        raise NameKeyError(
            f"{path} holds {len(key)} bytes, not {NAME_KEY_BYTES}; restore it from a backup "
            "(a new key would make earlier hashed names untraceable)"
        )
    return key


def verify(folder: Path, expected_head: tuple[int, str] | None = None) -> VerifyReport:
    """Check seq continuity, the hash chain across files, each hash and each line's day."""
    files = sorted(folder.glob("audit-*.jsonl")) if folder.is_dir() else []
    checker = _ChainChecker(expected_head)
    try:
        for index, path in enumerate(files):
            checker.check_file(path, is_last=index == len(files) - 1)
        checker.check_end(files[-1].name if files else folder.name)
    except _ChainError as exc:
        return VerifyReport(False, checker.lines, len(files), str(exc), checker.torn_tail)
    return VerifyReport(True, checker.lines, len(files), None, checker.torn_tail)


def read_lines(folder: Path) -> Iterator[dict[str, object]]:
    """Yield every complete line of every file in order (a torn tail is skipped)."""
    for path in _log_files(folder):
        with path.open("rb") as file:
            for number, raw in enumerate(file, start=1):
                if not raw.endswith(b"\n"):
                    continue
                line = json.loads(raw)
                if not isinstance(line, dict):
                    raise ValueError(f"{path.name} line {number}: not a JSON object")
                yield line


class _ChainError(Exception):
    pass


class _ChainChecker:
    def __init__(self, expected_head: tuple[int, str] | None) -> None:
        self.lines = 0
        self.torn_tail = False
        self._seq = 0
        self._hash = GENESIS_HASH
        self._expected_head = expected_head

    def check_file(self, path: Path, *, is_last: bool) -> None:
        match = _FILE_NAME.fullmatch(path.name)
        if match is None:
            raise _ChainError(f"{path.name}: file name is not audit-YYYY-MM-DD.jsonl")
        with path.open("rb") as file:
            for number, raw in enumerate(file, start=1):
                where = f"{path.name} line {number}"
                if not raw.endswith(b"\n"):
                    if not is_last:
                        raise _ChainError(f"{where}: unterminated line before the last file")
                    self.torn_tail = True
                    return
                self._check_line(where, match[1], raw)

    def check_end(self, name: str) -> None:
        if self._expected_head is not None and self._seq < self._expected_head[0]:
            raise _ChainError(
                f"{name}: log ends at seq {self._seq} "
                f"but the journal records seq {self._expected_head[0]}"
            )

    def _check_line(self, where: str, day: str, raw: bytes) -> None:
        try:
            line = json.loads(raw)
        except ValueError as exc:
            raise _ChainError(f"{where}: bad JSON") from exc
        if not isinstance(line, dict):
            raise _ChainError(f"{where}: bad JSON (not an object)")
        seq, prev, digest, ts = (line.get(key) for key in ("seq", "prev", "hash", "ts"))
        if not (isinstance(seq, int) and isinstance(prev, str) and isinstance(digest, str)):
            raise _ChainError(f"{where}: missing or invalid seq, prev or hash")
        if seq != self._seq + 1:
            raise _ChainError(f"{where}: seq {seq} expected {self._seq + 1}")
        if prev != self._hash:
            raise _ChainError(f"{where}: prev does not match previous hash")
        del line["hash"]
        if _line_hash(prev, line) != digest:
            raise _ChainError(f"{where}: hash mismatch (line altered)")
        if not isinstance(ts, str) or ts[:10] != day:
            raise _ChainError(f"{where}: date of ts does not match file name")
        head = self._expected_head
        if head is not None and head[0] == seq and head[1] != digest:
            raise _ChainError(f"{where}: hash of seq {seq} differs from the journal's")
        self._seq, self._hash = seq, digest
        self.lines += 1


def _canonical(obj: dict[str, object]) -> str:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=True)


def _line_hash(prev: str, line_without_hash: dict[str, object]) -> str:
    return hashlib.sha256((prev + _canonical(line_without_hash)).encode("ascii")).hexdigest()


def _format_ts(ms: int) -> str:
    seconds, millis = divmod(ms, 1000)
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(seconds)) + f".{millis:03d}Z"


def _parse_head(raw: bytes) -> tuple[int, str, int]:
    line = json.loads(raw)
    seq, digest, ts = line["seq"], line["hash"], line["ts"]
    if not (isinstance(seq, int) and isinstance(digest, str) and isinstance(ts, str)):
        raise TypeError("seq, hash or ts has the wrong type")
    return seq, digest, round(datetime.fromisoformat(ts).timestamp() * 1000)


def _log_files(folder: Path) -> list[Path]:
    return sorted(path for path in folder.glob("audit-*.jsonl") if _FILE_NAME.fullmatch(path.name))


def _read_last_line(path: Path) -> tuple[bytes | None, int]:
    """The last newline-terminated line (without its newline) and the size of the torn tail."""
    with path.open("rb") as file:
        pos = file.seek(0, os.SEEK_END)
        buf = b""
        while pos > 0 and buf.count(b"\n") < 2:
            step = min(_TAIL_CHUNK_BYTES, pos)
            pos -= step
            file.seek(pos)
            buf = file.read(step) + buf
    end = buf.rfind(b"\n")
    if end == -1:
        return None, len(buf)
    return buf[buf.rfind(b"\n", 0, end) + 1 : end], len(buf) - end - 1


def _truncate(path: Path, size: int) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CLOEXEC)
    try:
        os.ftruncate(fd, size)
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


def _fsync_dir(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class TolerantAuditLog(AuditLog):
    """The service's audit log: a write the disk refuses never stops the service.

    The refused line is dropped (the file and `head` stay as they were) and `failing_since`
    set; the service then pauses, and once `recover()` can write again it rebuilds the missing
    lines from the journal, which is the truth (daemon/audit_reconcile.py).
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
        self.append(AuditEvent.AUDIT_RECOVERED, reason="audit_unwritable")
        self.sync()
        if self.failing_since is not None:
            self.failing_since = since
            return None
        return since

    def _fail(self, exc: OSError) -> None:
        if self.failing_since is None:
            self.failing_since = time.time()
            log.error("audit.unwritable", errno=exc.errno)

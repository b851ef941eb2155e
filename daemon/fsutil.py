"""Filesystem and time helpers shared by every part: each rule written once.

Pure functions; safe in the main process and in workers.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import os
import time
from collections.abc import Iterator
from pathlib import Path

READ_BYTES = 1 << 20
# The smallest buffer a read of an expected size gets: a file that grew since its stat is still
# read in chunks of a sensible size.
MIN_READ_BYTES = 1 << 16
_OPEN_FILE = os.O_RDONLY | os.O_CLOEXEC


FOLDER_MODE = 0o750


def make_folder(folder: Path) -> None:
    """Create `folder` and any missing parent as FOLDER_MODE, whatever the umask (mkdir's
    `parents=True` would give the parents the default mode)."""
    missing = []
    while not folder.is_dir():
        missing.append(folder)
        folder = folder.parent
    for path in reversed(missing):
        with contextlib.suppress(FileExistsError):
            path.mkdir(mode=FOLDER_MODE)
            os.chmod(path, FOLDER_MODE)


def fsync_dir(folder: Path) -> None:
    """Make the entries of `folder` (a create, a rename) durable."""
    fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def sync_file(path: str) -> None:
    """Make what was written to the file at `path` durable (fdatasync, from any process or
    thread); a file that is not there has nothing to make durable."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        return
    try:
        os.fdatasync(fd)
    finally:
        os.close(fd)


def write_all(fd: int, data: bytes | memoryview) -> None:
    """os.write until every byte is written (a short write is not an error)."""
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


def read_chunks(fd: int, size: int = READ_BYTES) -> Iterator[memoryview]:
    """What `fd` reads from its offset, a chunk at a time, into one buffer reused for every
    chunk (`chunk.obj`; each chunk starts at its offset 0 and is valid until the next is read).
    A fresh `bytes` a chunk would be a fresh mapping each time: 256 page faults a MiB read."""
    buffer = bytearray(size)
    view = memoryview(buffer)
    while n := os.readv(fd, [buffer]):
        yield view[:n]


def sha256_fd(
    fd: int, max_bytes: int | None = None, copy_fd: int | None = None, expected: int | None = None
) -> tuple[str, int] | None:
    """sha256 and size of what `fd` reads from its offset (copied to `copy_fd` on the way);
    None once past `max_bytes` (read at most one chunk past the limit: a file still growing is
    never read whole). `expected`, the size its stat gave, sizes the buffer: a small file is
    not read into a zeroed MiB (11 µs each, more than its read and hash)."""
    digest = hashlib.sha256()
    size = 0
    chunk_size = READ_BYTES if expected is None else max(MIN_READ_BYTES, expected + 1)
    for chunk in read_chunks(fd, min(READ_BYTES, chunk_size)):
        digest.update(chunk)
        size += len(chunk)
        if max_bytes is not None and size > max_bytes:
            return None
        if copy_fd is not None:
            write_all(copy_fd, chunk)
    return digest.hexdigest(), size


def sha256_of(path: Path) -> str:
    """sha256 of a file's content."""
    fd = os.open(path, _OPEN_FILE)
    try:
        result = sha256_fd(fd)
    finally:
        os.close(fd)
    assert result is not None
    return result[0]


def atomic_write(path: Path, data: bytes, mode: int) -> None:
    """Write `path` whole or not at all: a hidden temporary beside it, fsync, rename, fsync the
    folder. Never follows a link at the temporary's name."""
    tmp = path.with_name(f".{path.name}.tmp")
    flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW | os.O_CLOEXEC
    fd = os.open(tmp, flags, mode)
    try:
        os.fchmod(fd, mode)
        write_all(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)
    os.rename(tmp, path)
    fsync_dir(path.parent)


def iso_utc(ts: float | None = None) -> str:
    """UTC ISO-8601 with milliseconds (`2026-01-31T12:00:00.123Z`); now by default."""
    return iso_utc_ms(int((time.time() if ts is None else ts) * 1000))


def iso_utc_ms(ms: int) -> str:
    """`iso_utc` of a time in whole milliseconds since the epoch."""
    seconds, millis = divmod(ms, 1000)
    return f"{_utc_second(seconds)}.{millis:03d}Z"


def utc_day(ts: float) -> str:
    """`YYYY-MM-DD` of `ts` in UTC (audit files, archive folders)."""
    return _utc_second(int(ts // 1))[:10]


@functools.lru_cache(maxsize=4)
def _utc_second(seconds: int) -> str:
    # An audit line and an archived input each need one: thousands a second share a few.
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(seconds))

"""One instance per state folder: an exclusive `flock` on `<state>/medbatch.lock`, held for the
life of `run` / `run --once`. Read-only commands never take it."""

from __future__ import annotations

import contextlib
import fcntl
import os
from pathlib import Path

from daemon.errors import InstanceLockedError

LOCK_NAME = "medbatch.lock"


class InstanceLock:
    """Held from `acquire` until `release` (or the process ends: the kernel drops a flock with
    its last descriptor, so a kill -9 never leaves a stale lock behind)."""

    def __init__(self, state: Path) -> None:
        self.path = state / LOCK_NAME
        self._fd: int | None = None

    def acquire(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True, mode=0o750)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _read_pid(fd)
            os.close(fd)
            raise InstanceLockedError(self.path, holder) from None
        except BaseException:
            os.close(fd)
            raise
        # The pid is for the message a second instance prints; the flock is what counts.
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self._fd = fd

    def release(self) -> None:
        if self._fd is not None:
            with contextlib.suppress(OSError):
                os.ftruncate(self._fd, 0)
            os.close(self._fd)
            self._fd = None

    def __enter__(self) -> InstanceLock:
        self.acquire()
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


def _read_pid(fd: int) -> int | None:
    try:
        text = os.pread(fd, 32, 0).decode("ascii", "replace").strip()
    except OSError:
        return None
    return int(text) if text.isdigit() else None

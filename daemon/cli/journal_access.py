"""The journal, opened read-only for a command that runs beside the service (a WAL reader neither
blocks the service nor waits for it)."""

from __future__ import annotations

import contextlib
import errno
import sqlite3
from collections.abc import Iterator

from daemon.config import Settings
from daemon.errors import JournalUnreadableError
from daemon.journal_queries import JournalQueries


@contextlib.contextmanager
def open_journal(settings: Settings) -> Iterator[JournalQueries | None]:
    """The journal, read-only, or None when the service never ran here."""
    path = settings.paths.journal
    try:
        if not path.exists():
            yield None
            return
    except PermissionError:
        raise _unreadable(settings, "permission denied") from None
    try:
        journal = JournalQueries.open_readonly(path)
    except PermissionError as exc:
        raise _unreadable(settings, exc.strerror or "permission denied") from None
    except sqlite3.DatabaseError as exc:
        is_permission = "unable to open" in str(exc) and not _can_read(path)
        if is_permission:
            raise _unreadable(settings, "permission denied") from None
        raise JournalUnreadableError(f"cannot read the journal {path}: {exc}") from None
    try:
        yield journal
    except sqlite3.DatabaseError as exc:
        if "unable to open" in str(exc) or "readonly" in str(exc):
            raise _unreadable(settings, "permission denied") from None
        raise JournalUnreadableError(f"cannot read the journal {path}: {exc}") from None
    finally:
        journal.close()


def _can_read(path: object) -> bool:
    try:
        with open(str(path), "rb") as f:
            f.read(1)
    except OSError as exc:
        return exc.errno != errno.EACCES
    return True


def _unreadable(settings: Settings, why: str) -> JournalUnreadableError:
    state = settings.paths.state
    return JournalUnreadableError(
        f"cannot read the journal in {state}: {why}. It is private to the service's user: run "
        f"this as that user (e.g. sudo -u medbatch medbatch …)",
        is_permission=True,
    )

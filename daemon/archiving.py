"""The renames (and deletions) that take published inputs out of the spool, wherever they run:
the claimer process (`daemon.intake.claimer`, which imports little) or the archiver's thread.

Nothing here touches the journal: whoever hands a lot over marks the ids that moved disposed.
"""

from __future__ import annotations

import errno
import os
from collections.abc import Callable
from pathlib import Path

import structlog

from daemon.fsutil import make_folder

log = structlog.get_logger()

Move = tuple[int, str, str | None]  # (file id, spooled path, archived path; None: delete)


def archive_all(moves: list[Move], folders: set[str] | list[str]) -> list[int]:
    """Make the day folders, rename each input into the archive (or delete it); the ids now out
    of the spool. A missing source was moved before a crash (after the commit): done too."""
    for folder in sorted(folders):
        make_folder(Path(folder))
    done = []
    for file_id, source, target in moves:
        try:
            if target is None:
                os.unlink(source)  # noqa: PTH108 - a string path: no Path built per input
            else:
                os.rename(source, target)
        except FileNotFoundError:
            pass
        except OSError as exc:  # kept in the spool; the next disposal tries again
            event = "disposal.archive_failed" if target else "disposal.failed"
            log.error(event, file_id=file_id,
                      errno=errno.errorcode.get(exc.errno or 0, str(exc.errno)))  # fmt: skip
            continue
        done.append(file_id)
    return done


def archive_lot(
    sync: Callable[[], None], moves: list[Move], folders: set[str] | list[str]
) -> list[int]:
    """`archive_all`, once `sync` made the journal's published marks durable (an fdatasync of
    its WAL); a journal that cannot be synced, or a folder that cannot be made, keeps every
    input."""
    try:
        sync()
        return archive_all(moves, folders)
    except OSError as exc:
        log.error("disposal.archive_failed", errno=errno.errorcode.get(exc.errno or 0))
        return []

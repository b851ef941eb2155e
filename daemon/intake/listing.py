"""An inbox listed in steps: a scan stopped by the cap on candidates goes on from where it
stopped, so a backlog of a million files is listed once, not once per cap's worth (main process).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Protocol


class _Entries(Iterator[os.DirEntry[str]], Protocol):
    def close(self) -> None: ...


class Listing:
    """One pass over an inbox folder, held open between steps.

    `refused_seen` collects only the names the caller says it has refused (`is_refused`), so
    the names of a large backlog are not all held: a full pass tells the caller which refused
    entries are still there. A file added after the pass began may be missed by it; the watch
    offers it, and the next pass lists it."""

    def __init__(self, folder: Path, entries: _Entries) -> None:
        self.folder = folder
        self._entries = entries
        self.refused_seen: list[str] = []
        self.is_complete = False  # listed to the end (not cut short by an error)

    @classmethod
    def open(cls, folder: Path) -> Listing | None:
        """A new pass, or None when the folder cannot be listed (a missing one is made again)."""
        try:
            return cls(folder, os.scandir(folder))
        except FileNotFoundError:
            folder.mkdir(parents=True, exist_ok=True)
        except OSError:
            pass
        return None

    def go_on(
        self,
        visit: Callable[[os.DirEntry[str]], None],
        is_full: Callable[[], bool],
        is_refused: Callable[[str], bool],
    ) -> bool:
        """Visit entries until the pass ends (True: closed, `is_complete` says whether it got to
        the end) or `is_full()` (False: call again later to go on)."""
        try:
            while not is_full():
                entry = next(self._entries, None)
                if entry is None:
                    self.is_complete = True
                    break
                visit(entry)
                if is_refused(entry.name):
                    self.refused_seen.append(entry.name)
            else:
                return False
        except OSError:
            pass
        self.close()
        return True

    def close(self) -> None:
        self._entries.close()

    def __del__(self) -> None:
        # A pass dropped half way (a reload removed its pipeline, the service stopped) releases
        # its directory descriptor here rather than in a ResourceWarning.
        self._entries.close()


class Passes:
    """The passes in progress, one per pipeline at most."""

    def __init__(self) -> None:
        self._open: dict[str, Listing] = {}

    def __bool__(self) -> bool:
        return bool(self._open)

    def go_on(
        self,
        pipeline: str,
        folder: Path,
        visit: Callable[[os.DirEntry[str]], None],
        is_full: Callable[[], bool],
        is_refused: Callable[[str], bool],
    ) -> list[str] | None:
        """Go on with `pipeline`'s pass (a new one if none is open). When it has listed the
        whole folder: the refused names it saw; else None (cut short, or unreadable)."""
        listing = self._open.pop(pipeline, None) or Listing.open(folder)
        if listing is None:
            return None
        if not listing.go_on(visit, is_full, is_refused):
            self._open[pipeline] = listing
            return None
        return listing.refused_seen if listing.is_complete else None

    def keep_only(self, pipelines: set[str]) -> None:
        for name in set(self._open) - pipelines:
            self._open.pop(name).close()

"""RefusalMemory: inbox entries intake could not take, remembered until they change (main loop).

A rescan skips them without a journal write or a claim attempt, so a flood of links or unreadable
files costs one listing, not a claim each; the memory is capped (least recently seen forgotten).
"""

from __future__ import annotations

import os
from collections import OrderedDict
from collections.abc import Iterable

# About 200 bytes an entry: the cap bounds the memory a producer can make us hold to ~20 MB.
MAX_REMEMBERED = 100_000

Key = tuple[str, str]  # (pipeline, name)
Stamp = tuple[int, int, int]  # (inode, mtime_ns, ctime_ns)


def stamp_of(st: os.stat_result) -> Stamp:
    return (st.st_ino, st.st_mtime_ns, st.st_ctime_ns)


class RefusalMemory:
    def __init__(self, capacity: int = MAX_REMEMBERED) -> None:
        self._capacity = capacity
        self._entries: OrderedDict[Key, tuple[Stamp, str]] = OrderedDict()

    def __len__(self) -> int:
        return len(self._entries)

    def remember(self, pipeline: str, name: str, st: os.stat_result, reason: str) -> None:
        key = (pipeline, name)
        self._entries[key] = (stamp_of(st), reason)
        self._entries.move_to_end(key)
        while len(self._entries) > self._capacity:
            self._entries.popitem(last=False)

    def inode(self, pipeline: str, name: str) -> int | None:
        found = self._entries.get((pipeline, name))
        return None if found is None else found[0][0]

    def knows(self, pipeline: str, name: str) -> bool:
        return (pipeline, name) in self._entries

    def is_unchanged(self, pipeline: str, name: str, st: os.stat_result) -> bool:
        found = self._entries.get((pipeline, name))
        return found is not None and found[0] == stamp_of(st)

    def forget(self, pipeline: str, name: str) -> None:
        self._entries.pop((pipeline, name), None)

    def keep_only(self, pipeline: str, names: Iterable[str]) -> None:
        """After a full listing of `pipeline`'s inbox: forget what is no longer there."""
        present = set(names)
        for key in [k for k in self._entries if k[0] == pipeline and k[1] not in present]:
            del self._entries[key]

    def forget_pipelines_except(self, pipelines: Iterable[str]) -> None:
        kept = set(pipelines)
        for key in [k for k in self._entries if k[0] not in kept]:
            del self._entries[key]

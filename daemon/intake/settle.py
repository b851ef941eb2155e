"""Candidates: inbox entries waiting to be complete, in two due-time heaps (main loop).

Entries an event told us about come before what a rescan found, so a new file is taken within a
step whatever backlog the inbox holds; both `next_due` and taking the due ones cost O(log n).
"""

from __future__ import annotations

import heapq
import itertools
from dataclasses import dataclass, field
from pathlib import Path

Signature = tuple[int, int, int]  # (inode, size, mtime_ns)


@dataclass
class Candidate:
    pipeline: str
    path: Path
    signature: Signature
    stable_since: float
    due: float
    is_writing: bool | None = None
    # A close or rename-in was seen: complete unless a writer still holds it (the lease says).
    is_closed_hint: bool = False
    is_urgent: bool = False  # seen by an event, not only by a rescan
    seq: int = field(default=0)


class Candidates:
    def __init__(self) -> None:
        self._by_path: dict[Path, Candidate] = {}
        self._urgent: list[tuple[float, int, Path]] = []
        self._backlog: list[tuple[float, int, Path]] = []
        self._counter = itertools.count()

    def __len__(self) -> int:
        return len(self._by_path)

    def __contains__(self, path: Path) -> bool:
        return path in self._by_path

    def get(self, path: Path) -> Candidate | None:
        return self._by_path.get(path)

    def values(self) -> list[Candidate]:
        return list(self._by_path.values())

    def add(self, candidate: Candidate) -> None:
        self._by_path[candidate.path] = candidate
        self.schedule(candidate, candidate.due)

    def schedule(self, candidate: Candidate, due: float) -> None:
        """(Re)set when to look at `candidate` again; older heap entries become stale."""
        candidate.due = due
        candidate.seq = next(self._counter)
        heap = self._urgent if candidate.is_urgent else self._backlog
        heapq.heappush(heap, (due, candidate.seq, candidate.path))

    def remove(self, path: Path) -> None:
        self._by_path.pop(path, None)

    def drop_pipelines_except(self, pipelines: set[str]) -> None:
        for path in [p for p, c in self._by_path.items() if c.pipeline not in pipelines]:
            del self._by_path[path]

    def next_due(self) -> float | None:
        times = [t for t in (self._top(self._urgent), self._top(self._backlog)) if t is not None]
        return min(times, default=None)

    def pop_due(self, now: float, limit: int) -> list[Candidate]:
        """Up to `limit` candidates due by `now`, event-seen ones first; they leave the heaps
        (the caller reschedules the ones it does not take)."""
        taken: list[Candidate] = []
        for heap in (self._urgent, self._backlog):
            while len(taken) < limit:
                due = self._top(heap)
                if due is None or due > now:
                    break
                _, _, path = heapq.heappop(heap)
                taken.append(self._by_path[path])
        return taken

    def _top(self, heap: list[tuple[float, int, Path]]) -> float | None:
        """The earliest live entry's due time, dropping stale entries on the way."""
        while heap:
            due, seq, path = heap[0]
            c = self._by_path.get(path)
            if c is not None and c.seq == seq:
                return due
            heapq.heappop(heap)
        return None

"""Candidates: inbox entries waiting to be complete, in two due-time heaps (main loop).

Entries an event told us about come before what a rescan found, so a new file is taken within a
step whatever backlog the inbox holds; both `next_due` and taking the due ones cost O(log n).
"""

from __future__ import annotations

import heapq
import itertools
import os
from collections.abc import Mapping
from dataclasses import dataclass, field

from daemon.config import Pipeline

Signature = tuple[int, int, int]  # (inode, size, mtime_ns)


@dataclass(slots=True)
class Candidate:
    pipeline: str
    # A string, not a Path: the main loop holds one per waiting file (100,000 in a backlog).
    path: str
    signature: Signature
    stable_since: float
    due: float
    is_writing: bool | None = None
    # A close or rename-in was seen: complete unless a writer still holds it (the lease says).
    is_closed_hint: bool = False
    is_urgent: bool = False  # seen by an event, not only by a rescan
    is_claiming: bool = False  # sent to the claimer: off the heaps until its outcome is back
    seq: int = field(default=0)

    @property
    def name(self) -> str:
        return self.path.rpartition("/")[2]


class Candidates:
    def __init__(self) -> None:
        self._by_path: dict[str, Candidate] = {}
        self._urgent: list[tuple[float, int, str]] = []
        self._backlog: list[tuple[float, int, str]] = []
        self._counter = itertools.count()

    def __len__(self) -> int:
        return len(self._by_path)

    def __contains__(self, path: str) -> bool:
        return path in self._by_path

    def get(self, path: str) -> Candidate | None:
        return self._by_path.get(path)

    def values(self) -> list[Candidate]:
        return list(self._by_path.values())

    def add(self, candidate: Candidate) -> None:
        self._by_path[candidate.path] = candidate
        self.schedule(candidate, candidate.due)

    def schedule(self, candidate: Candidate, due: float) -> None:
        """(Re)set when to look at `candidate` again; older heap entries become stale. One
        being claimed is not looked at again before its outcome is back."""
        candidate.due = due
        if candidate.is_claiming:
            return
        candidate.seq = next(self._counter)
        heap = self._urgent if candidate.is_urgent else self._backlog
        heapq.heappush(heap, (due, candidate.seq, candidate.path))

    def remove(self, path: str, candidate: Candidate | None = None) -> None:
        """Forget the candidate at `path` (only if it is `candidate`, when given)."""
        if candidate is None or self._by_path.get(path) is candidate:
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

    def _top(self, heap: list[tuple[float, int, str]]) -> float | None:
        """The earliest live entry's due time, dropping stale entries on the way."""
        while heap:
            due, seq, path = heap[0]
            c = self._by_path.get(path)
            if c is not None and c.seq == seq:
                return due
            heapq.heappop(heap)
        return None


def signature_of(st: os.stat_result) -> Signature:
    return (st.st_ino, st.st_size, st.st_mtime_ns)


def settled(
    candidates: Candidates, pipelines: Mapping[str, Pipeline], now: float, limit: int
) -> list[tuple[Candidate, bool]]:
    """Due candidates worth a claim attempt, each with whether it passed the settle rule
    (needed when no lease can tell whether a writer still holds it)."""
    ready: list[tuple[Candidate, bool]] = []
    for c in candidates.pop_due(now, limit):
        pipeline = pipelines[c.pipeline]
        # With no settle time there is nothing to wait for: the claim's own checks on the pinned
        # entry (a regular file, no writer holding it, gone: quietly dropped) decide, without a
        # look here first (an lstat a file on a backlog).
        if pipeline.settle_s > 0:
            try:
                st = os.lstat(c.path)
            except OSError:
                candidates.remove(c.path)
                continue
            signature = signature_of(st)
            if signature != c.signature:
                c.signature, c.stable_since = signature, now
                if not c.is_closed_hint:
                    candidates.schedule(c, now + pipeline.settle_s)
                    continue
        is_settled = now >= c.stable_since + pipeline.settle_s
        timed_out = now - c.stable_since >= max(pipeline.max_incomplete_s, pipeline.settle_s)
        if c.is_closed_hint or (is_settled and (not c.is_writing or timed_out)):
            # A lost close event (inotify overflow) must not hold a file forever either.
            ready.append((c, is_settled and (not c.is_writing or timed_out)))
        else:
            candidates.schedule(
                c, c.stable_since + max(pipeline.max_incomplete_s, pipeline.settle_s)
            )
    return ready

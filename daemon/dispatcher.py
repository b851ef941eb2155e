"""PriorityDispatcher: sealed batches wait in a heap; the main loop takes them as slots free up.

Aging: a batch gains one priority level per `aging_s` it waits. Ranking by
``priority * aging_s + sealed_at`` is exactly that rule and does not change with time, so a plain
heap keeps the order: an urgent batch goes first, and a routine one overtakes every urgent batch
sealed more than (its priority - theirs) * aging_s after it, so nothing starves.
"""

from __future__ import annotations

import heapq
import itertools
from dataclasses import dataclass, field

from daemon.models import BatchTask


@dataclass(order=True)
class _Entry:
    rank: float
    order: int
    task: BatchTask = field(compare=False)


class PriorityDispatcher:
    def __init__(self, slots: int, memory_budget: int, aging_s: float) -> None:
        self.slots = slots
        self.memory_budget = memory_budget
        self.aging_s = aging_s
        self._heap: list[_Entry] = []
        self._counter = itertools.count()
        self._running: dict[str, int] = {}

    def push(self, task: BatchTask) -> None:
        batch = task.batch
        rank = batch.priority * self.aging_s + batch.sealed_at
        heapq.heappush(self._heap, _Entry(rank, next(self._counter), task))

    def pop_ready(self) -> list[BatchTask]:
        """Tasks to start now: free slots, and memory to spare (the head never gets skipped).

        A batch estimated above the whole budget runs alone rather than never.
        """
        ready = []
        while self._heap and len(self._running) < self.slots:
            task = self._heap[0].task
            in_use = sum(self._running.values())
            if self._running and in_use + task.memory_estimate > self.memory_budget:
                break
            heapq.heappop(self._heap)
            self._running[task.batch.batch_id] = task.memory_estimate
            ready.append(task)
        return ready

    def done(self, batch_id: str) -> None:
        self._running.pop(batch_id, None)

    def reconfigure(self, slots: int, memory_budget: int, aging_s: float) -> None:
        self.slots, self.memory_budget = slots, memory_budget
        if aging_s != self.aging_s:
            self.aging_s = aging_s
            waiting = [entry.task for entry in self._heap]
            self._heap.clear()
            for task in waiting:
                self.push(task)

    @property
    def waiting(self) -> list[BatchTask]:
        return [entry.task for entry in sorted(self._heap)]

    @property
    def running(self) -> int:
        return len(self._running)

    def __len__(self) -> int:
        return len(self._heap)

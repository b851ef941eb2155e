"""PriorityDispatcher: priority, aging, free slots and the memory budget."""

from __future__ import annotations

from pathlib import Path

from daemon.dispatcher import PriorityDispatcher
from daemon.models import Batch, BatchTask


def task(batch_id: str, priority: int, sealed_at: float, memory: int = 0) -> BatchTask:
    batch = Batch(batch_id, "p", "emr", priority, sealed_at, ())
    return BatchTask(batch, {}, Path("/out"), memory)


def ids(tasks: list[BatchTask]) -> list[str]:
    return [t.batch.batch_id for t in tasks]


def test_urgent_first_then_oldest() -> None:
    """Lower priority numbers run first; among equals, the older batch."""
    d = PriorityDispatcher(slots=10, memory_budget=10**9, aging_s=60)
    for t in (task("routine", 5, 0), task("urgent-new", 1, 10), task("urgent-old", 1, 5)):
        d.push(t)
    assert ids(d.pop_ready()) == ["urgent-old", "urgent-new", "routine"]


def test_never_more_in_flight_than_slots() -> None:
    """Only as many batches as free slots leave the heap; done() frees a slot."""
    d = PriorityDispatcher(slots=1, memory_budget=10**9, aging_s=60)
    d.push(task("a", 3, 0))
    d.push(task("b", 3, 1))
    assert ids(d.pop_ready()) == ["a"]
    assert d.pop_ready() == []
    d.done("a")
    assert ids(d.pop_ready()) == ["b"]


def test_aging_lets_a_routine_batch_overtake_later_urgent_ones() -> None:
    """A priority-5 batch waiting 4 aging_s periods ranks with a priority-1 batch sealed now."""
    d = PriorityDispatcher(slots=1, memory_budget=10**9, aging_s=10)
    d.push(task("routine", 5, 0))
    d.push(task("urgent-later", 1, 41))
    d.push(task("urgent-sooner", 1, 39))
    order = []
    while len(d):
        (t,) = d.pop_ready()
        order.append(t.batch.batch_id)
        d.done(t.batch.batch_id)
    assert order == ["urgent-sooner", "routine", "urgent-later"]


def test_memory_budget_holds_the_next_batch_but_never_skips_it() -> None:
    """The head waits while it would exceed the budget; smaller ones behind it wait too."""
    d = PriorityDispatcher(slots=4, memory_budget=100, aging_s=60)
    d.push(task("big", 1, 0, memory=80))
    d.push(task("bigger", 2, 0, memory=50))
    d.push(task("small", 3, 0, memory=1))
    assert ids(d.pop_ready()) == ["big"]
    d.done("big")
    assert ids(d.pop_ready()) == ["bigger", "small"]


def test_a_batch_over_the_whole_budget_runs_alone() -> None:
    """A batch larger than the budget runs when nothing else does, rather than never."""
    d = PriorityDispatcher(slots=2, memory_budget=100, aging_s=60)
    d.push(task("huge", 1, 0, memory=500))
    assert ids(d.pop_ready()) == ["huge"]
    d.push(task("next", 1, 1, memory=1))
    assert d.pop_ready() == []


def test_reconfigure_reorders_with_the_new_aging() -> None:
    """Changing aging_s re-ranks the waiting batches."""
    d = PriorityDispatcher(slots=0, memory_budget=100, aging_s=1000)
    d.push(task("routine-old", 5, 0))
    d.push(task("urgent-new", 1, 100))
    d.reconfigure(slots=1, memory_budget=100, aging_s=1)
    assert ids(d.waiting) == ["routine-old", "urgent-new"]

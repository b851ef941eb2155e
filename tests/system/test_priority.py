"""Priority order with one worker: urgent batches first, and aging so routine work never starves."""

from __future__ import annotations

from typing import Any

from tests.support.accounting import check_accounting
from tests.support.waiting import wait_until
from tests.system.conftest import MakeService


def pipeline(name: str, priority: int) -> dict[str, Any]:
    return {
        "name": name,
        "kind": "faulty",
        "priority": priority,
        "max_files": 1,
        "max_wait": 30,
        "settle_s": 0.05,
    }


def slow(seconds: float, tag: str) -> bytes:
    return f"MEDBATCH-TEST-SLEEP-{seconds}\n{tag}\n".encode()


def published_order(service: Any) -> list[str]:
    """Pipelines of the published batches, in the order they were published."""
    return [line["pipeline"] for line in service.audit() if line["event"] == "batch.published"]


def started_batches(service: Any) -> int:
    return sum(line["event"] == "batch.started" for line in service.audit())


def test_a_later_urgent_batch_overtakes_the_routine_backlog(make_service: MakeService) -> None:
    """With one worker busy and four routine batches waiting, a priority-1 batch dropped
    afterwards is published right after the running one, before the rest of the backlog."""
    service = make_service(
        [pipeline("routine", 5), pipeline("urgent", 1)],
        workers={"count": 1},
        dispatch={"aging_s": 3600},
    )
    service.start()
    dropped = {}
    for i in range(5):
        dropped[f"r{i}"] = service.drop("routine", f"r{i}", slow(0.6, f"r{i}"))
    wait_until(lambda: len(service.journal("SELECT id FROM batches")) == 5, 20)
    dropped["u"] = service.drop("urgent", "u", slow(0.1, "u"))

    wait_until(lambda: len(published_order(service)) == 6, 60)
    assert service.stop() == 0

    order = published_order(service)
    assert order.index("urgent") == 1, order  # after the routine batch that was running
    check_accounting(service, dropped)


def test_aging_lets_a_routine_batch_through_a_steady_urgent_stream(
    make_service: MakeService,
) -> None:
    """Urgent batches keep arriving faster than one worker can take them; a routine batch
    still runs once it has waited (priority difference x aging_s), ahead of urgent ones that
    were sealed before it started."""
    service = make_service(
        [pipeline("routine", 5), pipeline("urgent", 1)],
        workers={"count": 1},
        dispatch={"aging_s": 0.5},
    )
    service.start()
    dropped = {"u0": service.drop("urgent", "u0", slow(0.3, "u0"))}
    # The worker busy first: on a loaded machine the routine file could otherwise be claimed
    # first and run at once, with no urgent batch yet to overtake.
    wait_until(lambda: started_batches(service) >= 1, 30, message="u0 started")
    dropped["routine"] = service.drop("routine", "routine", slow(0.1, "routine"))
    for i in range(1, 30):
        dropped[f"u{i}"] = service.drop("urgent", f"u{i}", slow(0.3, f"u{i}"))
        if "routine" in published_order(service):
            break
        # Two urgent files per batch the worker starts: faster than it takes them, and spread
        # over more than the aging span (files renamed in are claimed within milliseconds).
        wait_until(
            lambda i=i: (
                len(service.journal("SELECT id FROM files")) > i + 1
                and started_batches(service) >= i // 2
            ),
            10,
        )
    wait_until(lambda: service.accounted() == len(dropped), 60, message="all accounted")
    assert service.stop() == 0

    lines = service.audit()
    started = {line["batch_id"]: line["seq"] for line in lines if line["event"] == "batch.started"}
    sealed = {
        line["batch_id"]: (line["seq"], line["pipeline"])
        for line in lines
        if line["event"] == "batch.sealed"
    }
    (routine_id,) = [b for b, (_, p) in sealed.items() if p == "routine"]
    overtaken = [
        b
        for b, (seq, p) in sealed.items()
        if p == "urgent" and seq < started[routine_id] and started[b] > started[routine_id]
    ]
    assert overtaken, "the routine batch never overtook an urgent batch waiting before it"
    assert published_order(service)[-1] == "urgent"  # it did not just run after the stream
    check_accounting(service, dropped)

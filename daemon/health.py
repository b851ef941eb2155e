"""The heartbeat record: what the service writes to the journal's meta and `status` reads back.

One dataclass is the whole contract between the two; written by the main loop, read by any
process (the journal read-only).
"""

from __future__ import annotations

from dataclasses import dataclass

from daemon.journal import Journal
from daemon.journal_queries import JournalQueries

HEARTBEAT_S = 5.0


@dataclass(frozen=True, slots=True)
class Health:
    """`heartbeat` is None after a clean stop; `audit_head` is the log's durable (seq, hash)."""

    heartbeat: float | None
    pid: int | None
    healthy: bool
    heartbeat_s: float = HEARTBEAT_S
    paused: str | None = None
    audit_head: tuple[int, str] | None = None
    audit_head_at: float | None = None
    # The parts that make `healthy` false, so that status and /healthz can name the broken one.
    workers_ok: bool = True
    watches_ok: bool = True


def write_health(journal: Journal, health: Health) -> None:
    """Record it; an unknown audit head (the log failing) keeps the last known one."""
    values: dict[str, object] = {
        "heartbeat": health.heartbeat,
        "pid": health.pid,
        "healthy": health.healthy,
        "heartbeat_s": health.heartbeat_s,
        "paused": health.paused,
        "workers_ok": health.workers_ok,
        "watches_ok": health.watches_ok,
    }
    if health.audit_head is not None:
        values["audit_head"] = list(health.audit_head)
        values["audit_head_at"] = health.audit_head_at
    journal.set_meta(**values)


def write_paused(journal: Journal, reason: str | None) -> None:
    """Intake paused (or resumed, None) at once, not at the next heartbeat."""
    journal.set_meta(paused=reason)


def read_health(journal: JournalQueries) -> Health:
    head = journal.meta("audit_head")
    at = journal.meta("audit_head_at")
    pid = journal.meta("pid")
    beat = journal.meta("heartbeat")
    return Health(
        heartbeat=None if beat is None else float(beat),
        pid=None if pid is None else int(pid),
        healthy=bool(journal.meta("healthy")),
        heartbeat_s=float(journal.meta("heartbeat_s") or HEARTBEAT_S),
        paused=journal.meta("paused"),
        audit_head=(int(head[0]), str(head[1])) if head else None,
        audit_head_at=None if at is None else float(at),
        workers_ok=journal.meta("workers_ok") is not False,
        watches_ok=journal.meta("watches_ok") is not False,
    )

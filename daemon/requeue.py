"""Requeue: a quarantined input goes back through its pipeline's inbox, its history kept.

`medbatch requeue` leaves a ticket in `<state>/requeue/` and renames the quarantined copy into the
inbox; the service (the only journal writer) links the new row to the old one when intake has
taken it, and writes `file.requeued`.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

from daemon.audit.events import FileRequeued, Record
from daemon.disposal import SIDECAR_SUFFIX
from daemon.fsutil import atomic_write
from daemon.journal import FileRow, Journal
from daemon.models import Reason

TICKETS = "requeue"
TICKET_MODE = 0o600
# Reasons that depend on the moment, not on the file: a second try may well succeed. Every other
# reason (a processor's refusal such as not_utf8, too_large, symlink, bad_header …) would recur
# unchanged on the same bytes, so requeueing it needs --force.
TRANSIENT_REASONS = frozenset(
    {
        Reason.WORKER_CRASH,
        Reason.TIMEOUT,
        Reason.DISK_FULL,
        Reason.EXECUTOR_UNAVAILABLE,
        Reason.EXECUTOR_ERROR,
        Reason.IO_ERROR,
        Reason.INTERRUPTED,
        Reason.AUDIT_UNWRITABLE,
        Reason.PIPELINE_REMOVED,
    }
)


def is_transient(reason: str | None) -> bool:
    return reason in TRANSIENT_REASONS


@dataclass(frozen=True, slots=True)
class Ticket:
    file_id: int
    pipeline: str
    sha256: str
    reason: str
    forced: bool


def tickets_folder(state: Path) -> Path:
    return state / TICKETS


def pending_ids(state: Path) -> set[int]:
    folder = tickets_folder(state)
    if not folder.is_dir():
        return set()
    return {int(p.stem) for p in folder.glob("*.json") if p.stem.isdigit()}


def hand_back(state: Path, inbox: Path, row: FileRow, copy: Path, *, forced: bool) -> Path:
    """Write the ticket, then move `copy` into the pipeline's inbox under a hidden name (intake
    ignores those) and rename it in; its sidecar goes. Return the name it got in the inbox."""
    folder = tickets_folder(state)
    folder.mkdir(mode=0o750, parents=True, exist_ok=True)
    ticket = Ticket(row.id, row.pipeline, row.sha256 or "", row.reason or "", forced)
    ticket_path = folder / f"{row.id}.json"
    atomic_write(ticket_path, json.dumps(asdict(ticket)).encode("ascii"), TICKET_MODE)
    target_folder = inbox / row.pipeline
    hidden = target_folder / f".medbatch-requeue-{row.id}.tmp"
    try:
        shutil.move(copy, hidden)  # a rename, or a copy when the inbox is another filesystem
        target = target_folder / row.name
        n = 1
        while os.path.lexists(target):
            target = target_folder / f"{row.name}.requeued-{row.id}.{n}"
            n += 1
        os.rename(hidden, target)
    except BaseException:
        ticket_path.unlink(missing_ok=True)
        raise
    with contextlib.suppress(FileNotFoundError):
        copy.with_name(copy.name + SIDECAR_SUFFIX).unlink()
    return target


class Requeues:
    """The service's side: link each ticket to the row intake made of its file."""

    def __init__(self, state: Path, journal: Journal, record: Callable[[Record], object]) -> None:
        self._folder = tickets_folder(state)
        self._journal = journal
        self._record = record

    def link(self) -> int:
        if not self._folder.is_dir():
            return 0
        linked = 0
        for path in sorted(self._folder.glob("*.json")):
            try:
                ticket = Ticket(**json.loads(path.read_bytes()))
            except (OSError, ValueError, TypeError):
                continue  # being written (atomic_write makes that rare) or foreign: left alone
            # Linked before a crash that left the ticket: finish with the same row.
            linked_to = self._journal.file_facts(ticket.file_id).get("requeued_to")
            new_id = (
                int(linked_to)
                if linked_to is not None
                else self._journal.requeued_incarnation(
                    ticket.pipeline, ticket.sha256, ticket.file_id
                )
            )
            if new_id is None:
                continue  # not taken by intake yet
            self._journal.link_requeue(ticket.file_id, new_id)
            self._record(
                FileRequeued(
                    pipeline=ticket.pipeline,
                    file_id=ticket.file_id,
                    new_file_id=new_id,
                    reason=ticket.reason,
                    sha256=ticket.sha256 or None,
                    forced=ticket.forced or None,
                )
            )
            path.unlink(missing_ok=True)
            linked += 1
        return linked

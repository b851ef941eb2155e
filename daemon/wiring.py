"""Wiring: the service's parts built in order, from the settings and the records. Main process."""

from __future__ import annotations

import logging
from collections.abc import Callable
from functools import partial
from typing import NamedTuple

from daemon.admission import Admission
from daemon.audit import TolerantAuditLog
from daemon.batch_flow import BatchFlow
from daemon.batcher import Batcher
from daemon.config import Pipeline, Settings
from daemon.dispatcher import PriorityDispatcher
from daemon.disposal import Archiver, Disposal
from daemon.fsutil import sync_file
from daemon.intake.claimer import ClaimerProcess
from daemon.intake.intake import Intake
from daemon.journal import Journal
from daemon.messages import Archived, Claimed, Message
from daemon.metrics import Metrics
from daemon.notify import Notifier
from daemon.outcome_listeners import IntakeGate, Progress, standard_listeners
from daemon.rollup import Rollups
from daemon.startup import by_name


class Parts(NamedTuple):
    intake: Intake
    batcher: Batcher
    dispatcher: PriorityDispatcher
    gate: IntakeGate
    disposal: Disposal
    flow: BatchFlow
    admission: Admission


def wire(
    settings: Settings,
    journal: Journal,
    audit: TolerantAuditLog,
    metrics: Metrics,
    progress: Progress,
    notifier: Notifier,
    pipelines: Callable[[], dict[str, Pipeline]],
    post: Callable[[Message], None],
) -> Parts:
    """Intake, batcher, dispatcher and the batch flow with its listeners, in order. Claims and
    archive renames run beside the main loop, and `post` it a message when some are done."""
    workers = settings.workers
    claimer = ClaimerProcess(lambda: post(Claimed()), _log_level())
    intake = Intake(settings, journal, audit, claimer=claimer)
    batcher = Batcher(by_name(settings))
    dispatcher = PriorityDispatcher(workers.count, workers.memory_budget, settings.dispatch.aging_s)
    gate = IntakeGate(audit, journal)
    # Archive renames in a process of their own (the claimer's code, given only lots to move),
    # beside the claims: in the claimer they queued behind its claims (bench/NOTES.md round 11).
    mover = ClaimerProcess(lambda: None, _log_level(), role="disposal.mover")
    mover.start()  # now: its imports done before the first publish, not during the next drops
    wal = journal.wal_path
    remote = partial(mover.archive, journal_wal=wal)
    archiver = Archiver(lambda: post(Archived()), partial(sync_file, wal), remote, mover.close)
    disposal = Disposal(settings.paths, journal, pipelines, archiver)
    rollups = Rollups(settings.paths.state, settings.paths.outbox, pipelines)
    listeners = standard_listeners(
        audit, metrics, gate, progress, notifier, disposal, rollups, journal
    )
    flow = BatchFlow(settings, journal, dispatcher, listeners, rollups=rollups)
    admission = Admission(journal, audit, disposal, batcher, pipelines)
    return Parts(intake, batcher, dispatcher, gate, disposal, flow, admission)


def _log_level() -> str:
    """The service's log level, for the processes it starts."""
    return logging.getLevelName(logging.getLogger().getEffectiveLevel())

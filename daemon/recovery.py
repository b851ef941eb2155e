"""Recovery at start-up: finish what a crash interrupted. Every step is idempotent. Main loop.

Stale staging folders go; interrupted claims finish; missing audit lines are rebuilt from the
journal (since its recorded head only); batches that were running are re-run, uncounted.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, replace

import structlog

from daemon.audit import AuditLog
from daemon.audit.events import AuditEvent, DaemonRecovered
from daemon.audit.reconcile import RECONCILE_SLACK_S, reconcile
from daemon.batch_flow import BatchFlow
from daemon.batcher import Batcher
from daemon.config import Settings
from daemon.disposal import Disposal
from daemon.health import read_health
from daemon.intake.intake import Intake
from daemon.journal import FileRow, Journal
from daemon.journal_queries import BatchRow
from daemon.models import Batch, BatchState, FileState, IncomingFile, Reason
from daemon.outbox import remove_stale_staging

log = structlog.get_logger()


@dataclass
class Recovery:
    settings: Settings
    journal: Journal
    audit: AuditLog
    intake: Intake
    batcher: Batcher
    flow: BatchFlow
    disposal: Disposal
    wall: Callable[[], float] = time.time

    def run(self) -> DaemonRecovered:
        """Recover; the event is recorded (and logged) when anything was found."""
        paths = self.settings.paths
        stale = remove_stale_staging(paths.outbox / p.name for p in self.settings.pipeline)
        adopted = self.intake.adopt_orphans()
        claims = self.intake.finish_interrupted_claims()
        # A kill between a journal commit and its audit line loses the line: rebuild it, from
        # the last recorded head on (and for every claim finished just now).
        since = read_health(self.journal).audit_head_at or 0.0
        since = min([since, *(c.received_at for c in claims)]) - RECONCILE_SLACK_S
        rebuilt = reconcile(self.journal, self.audit, paths.audit, max(since, 0.0))
        self.disposal.dispose()
        rerun, removed = self._rerun_batches()
        reopened, orphans = self._rebatch_received()
        removed += orphans
        if removed:
            reconcile(self.journal, self.audit, paths.audit, self.wall() - RECONCILE_SLACK_S)
            self.disposal.dispose()
        found = DaemonRecovered(
            stale_staging=stale,
            claims_finished=len(claims),
            orphans_adopted=adopted,
            batches_rerun=rerun,
            files_rebatched=reopened,
            audit_lines_rebuilt=rebuilt,
            files_of_removed_pipelines=removed,
        )
        if any(found.payload().values()):
            self.audit.record(found)
            log.info(AuditEvent.DAEMON_RECOVERED, **found.payload())
        return found

    def _rerun_batches(self) -> tuple[int, int]:
        """Sealed and interrupted batches back in line; (batches, files of removed pipelines)."""
        pipelines = {p.name: p for p in self.settings.pipeline}
        rerun = removed = 0
        for row in self.journal.unfinished_batches():
            if row.state == BatchState.RUNNING:
                # Interrupted by the crash or stop, not failed: that attempt does not count.
                self.journal.mark_sealed_again(row.id, Reason.INTERRUPTED, is_counted=False)
                row = replace(row, attempts=row.attempts - 1)
            files = [
                self.incoming(f)
                for f in self.journal.batch_files(row.id)
                if f.state == FileState.BATCHED
            ]
            pipeline = pipelines.get(row.pipeline)
            if pipeline is None:
                # Removed from the config while the service was down: nothing can run it.
                self.journal.mark_failed(row.id, Reason.PIPELINE_REMOVED, self.wall())
                removed += len(files)
            elif files:
                self.flow.push(_batch(row, pipeline.kind, files))
                rerun += 1
        return rerun, removed

    def _rebatch_received(self) -> tuple[int, int]:
        """Claimed files not yet in a batch go into open batches again; (files, orphans)."""
        pipelines = {p.name for p in self.settings.pipeline}
        reopened = 0
        orphans = []
        for received in self.journal.received():
            if received.pipeline not in pipelines:
                orphans.append(received.id)
                continue
            for sealed in self.batcher.add(self.incoming(received), self.wall()):
                self.flow.seal(sealed)
            reopened += 1
        if orphans:
            self.journal.quarantine_received(orphans, Reason.PIPELINE_REMOVED, self.wall())
        return reopened, len(orphans)

    def incoming(self, row: FileRow) -> IncomingFile:
        return IncomingFile(
            row.id,
            row.pipeline,
            row.name,
            self.settings.paths.spool / row.spool_name,
            row.sha256 or "",
            row.size or 0,
            row.received_at,
            group=row.group_key or "",
        )


def _batch(row: BatchRow, kind: str, files: list[IncomingFile]) -> Batch:
    return Batch(
        row.id, row.pipeline, kind, row.priority, row.sealed_at, tuple(files), row.attempts
    )

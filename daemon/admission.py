"""Admission: a claimed file joins its pipeline's open batch, unless a pipeline with
`duplicates = "skip"` already published its content (then it is recorded as a duplicate).
Main loop.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

from daemon.audit import AuditLog
from daemon.audit.events import FileDuplicate
from daemon.batcher import Batcher, Sealed
from daemon.config import Pipeline
from daemon.disposal import Disposal
from daemon.journal import Journal
from daemon.models import IncomingFile


class Admission:
    def __init__(
        self,
        journal: Journal,
        audit: AuditLog,
        disposal: Disposal,
        batcher: Batcher,
        pipelines: Callable[[], Mapping[str, Pipeline]],
    ) -> None:
        self._journal = journal
        self._audit = audit
        self._disposal = disposal
        self._batcher = batcher
        self._pipelines = pipelines

    def admit(self, incoming: IncomingFile, now: float) -> list[Sealed]:
        """Add it to its open batch; return what that seals."""
        pipeline = self._pipelines().get(incoming.pipeline)
        if pipeline is None:
            return []  # removed by a reload while it settled: recovery quarantines it
        if pipeline.duplicates == "skip" and self.is_duplicate(incoming):
            return []
        return self._batcher.add(incoming, now)

    def is_duplicate(self, incoming: IncomingFile) -> bool:
        """True (and recorded, audited, disposed of) when an earlier batch published it."""
        earlier = self._journal.publisher_of(incoming.pipeline, incoming.sha256)
        if earlier is None:
            return False
        self._journal.mark_duplicates([(incoming.file_id, earlier)])
        self._audit.record(
            FileDuplicate(
                pipeline=incoming.pipeline,
                file_id=incoming.file_id,
                sha256=incoming.sha256,
                batch_id=earlier,
            )
        )
        self._disposal.dispose()
        return True

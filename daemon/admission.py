"""Admission: a claimed file joins its pipeline's open batch, unless a pipeline with
`duplicates = "skip"` already published its content (then it is recorded as a duplicate).
Main loop.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

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

    def admit(self, files: Sequence[IncomingFile], now: float) -> list[Sealed]:
        """Add each to its open batch (a claim group's earlier publishers looked up at once, not
        one query a file); return what that seals."""
        pipelines = self._pipelines()
        skip = {p.name for p in pipelines.values() if p.duplicates == "skip"}
        skip &= {f.pipeline for f in files}
        published = {
            name: self._journal.publishers_of(name, [f.sha256 for f in files if f.pipeline == name])
            for name in skip
        }
        sealed: list[Sealed] = []
        duplicates: list[tuple[IncomingFile, str]] = []
        for incoming in files:
            if incoming.pipeline not in pipelines:
                continue  # removed by a reload while it settled: recovery quarantines it
            earlier = published.get(incoming.pipeline, {}).get(incoming.sha256)
            if earlier is not None:
                duplicates.append((incoming, earlier))
            else:
                sealed += self._batcher.add(incoming, now)
        if duplicates:
            self._record_duplicates(duplicates)
        return sealed

    def _record_duplicates(self, duplicates: list[tuple[IncomingFile, str]]) -> None:
        """Files an earlier batch published: recorded (one commit), audited, disposed of (once
        for the claim group, not once a file)."""
        self._journal.mark_duplicates([(f.file_id, earlier) for f, earlier in duplicates])
        for incoming, earlier in duplicates:
            self._audit.record(
                FileDuplicate(
                    pipeline=incoming.pipeline,
                    file_id=incoming.file_id,
                    sha256=incoming.sha256,
                    batch_id=earlier,
                )
            )
        self._disposal.dispose()

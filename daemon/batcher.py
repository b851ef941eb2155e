"""Batcher: one open batch per pipeline, sealed by file count, bytes or age. Pure; main loop only.

A batch's window starts at its first file's arrival time as recorded in the journal, so a restart
does not restart the clock: a batch half way through its window seals at its original deadline.
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

from daemon.config import Pipeline
from daemon.models import Batch, IncomingFile


@dataclass
class OpenBatch:
    pipeline: Pipeline
    files: list[IncomingFile] = field(default_factory=list)
    n_bytes: int = 0

    @property
    def opened_at(self) -> float:
        return self.files[0].received_at

    @property
    def deadline(self) -> float:
        return self.opened_at + self.pipeline.max_wait

    @property
    def is_full(self) -> bool:
        return len(self.files) >= self.pipeline.max_files or self.n_bytes >= self.pipeline.max_bytes


@dataclass(frozen=True, slots=True)
class Sealed:
    batch: Batch
    opened_at: float


def batch_id_for(pipeline: str, sealed_at: float, files: Iterable[IncomingFile]) -> str:
    """`YYYYMMDDTHHMMSSZ-<pipeline>-<8 hex>`: sorts by time; the hex is fixed by the members."""
    digest = hashlib.sha256(",".join(str(f.file_id) for f in files).encode()).hexdigest()[:8]
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime(sealed_at))
    return f"{stamp}-{pipeline}-{digest}"


class Batcher:
    def __init__(self, pipelines: Mapping[str, Pipeline]) -> None:
        self._pipelines = dict(pipelines)
        self._open: dict[str, OpenBatch] = {}

    def reconfigure(self, pipelines: Mapping[str, Pipeline]) -> None:
        """Apply new limits; open batches keep their files and arrival times."""
        self._pipelines = dict(pipelines)
        for name, open_batch in list(self._open.items()):
            if name in self._pipelines:
                open_batch.pipeline = self._pipelines[name]

    def add(self, incoming: IncomingFile, now: float) -> list[Sealed]:
        """Add a claimed file; return what this seals (at most two batches)."""
        pipeline = self._pipelines[incoming.pipeline]
        sealed = []
        current = self._open.get(pipeline.name)
        if current and current.n_bytes + incoming.size > pipeline.max_bytes:
            sealed.append(self._seal(pipeline.name, now))
        current = self._open.setdefault(pipeline.name, OpenBatch(pipeline))
        current.files.append(incoming)
        current.n_bytes += incoming.size
        if len(current.files) >= pipeline.max_files or current.n_bytes >= pipeline.max_bytes:
            sealed.append(self._seal(pipeline.name, now))
        return sealed

    def seal_due(self, now: float) -> list[Sealed]:
        """Batches whose window has passed, or already at a limit that a reload lowered."""
        due = [name for name, b in self._open.items() if b.deadline <= now or b.is_full]
        return [self._seal(name, now) for name in due]

    def seal_all(self, now: float) -> list[Sealed]:
        return [self._seal(name, now) for name in list(self._open)]

    def open_batches(self) -> dict[str, OpenBatch]:
        return dict(self._open)

    def _seal(self, name: str, now: float) -> Sealed:
        open_batch = self._open.pop(name)
        pipeline = open_batch.pipeline
        batch = Batch(
            batch_id=batch_id_for(name, now, open_batch.files),
            pipeline=name,
            kind=pipeline.kind,
            priority=pipeline.priority,
            sealed_at=now,
            files=tuple(open_batch.files),
        )
        return Sealed(batch, open_batch.opened_at)

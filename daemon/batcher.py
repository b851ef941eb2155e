"""Batcher: one open batch per pipeline (per DICOM series or study in a `batch_by` pipeline),
sealed by file count, bytes or age, or once its series is stable. Pure; main loop only.

Windows are timed by their files' arrival times as recorded in the journal, so a restart does not
restart the clock: a batch half way through its window seals at its original deadline.
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

from daemon.config import Pipeline
from daemon.models import UNKNOWN_GROUP, Batch, IncomingFile

# (pipeline, group): a group is "" in an arrival pipeline, UNKNOWN_GROUP goes by arrival too.
WindowKey = tuple[str, str]


@dataclass
class OpenBatch:
    pipeline: Pipeline
    group: str = ""
    files: list[IncomingFile] = field(default_factory=list)
    n_bytes: int = 0
    last_at: float = float("-inf")  # the latest arrival: a series is stable stable_s after it

    @property
    def opened_at(self) -> float:
        return self.files[0].received_at

    @property
    def deadline(self) -> float:
        ceiling = self.opened_at + self.pipeline.max_wait
        if self.group in ("", UNKNOWN_GROUP) or not self.pipeline.is_grouped:
            return ceiling
        return min(ceiling, self.last_at + self.pipeline.stable_s)

    def append(self, incoming: IncomingFile) -> None:
        self.files.append(incoming)
        self.n_bytes += incoming.size
        self.last_at = max(self.last_at, incoming.received_at)

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
        self._open: dict[WindowKey, OpenBatch] = {}

    def reconfigure(self, pipelines: Mapping[str, Pipeline]) -> None:
        """Apply new limits; open batches keep their files, groups and arrival times."""
        self._pipelines = dict(pipelines)
        for (name, _), open_batch in list(self._open.items()):
            if name in self._pipelines:
                open_batch.pipeline = self._pipelines[name]

    def add(self, incoming: IncomingFile, now: float) -> list[Sealed]:
        """Add a claimed file to its window; return what this seals (at most two batches)."""
        pipeline = self._pipelines[incoming.pipeline]
        key = (pipeline.name, incoming.group if pipeline.is_grouped else "")
        sealed = []
        current = self._open.get(key)
        if current and current.n_bytes + incoming.size > pipeline.max_bytes:
            sealed.append(self._seal(key, now))
        current = self._open.setdefault(key, OpenBatch(pipeline, key[1]))
        current.append(incoming)
        if current.is_full:
            sealed.append(self._seal(key, now))
        return sealed

    def seal_due(self, now: float) -> list[Sealed]:
        """Windows that passed (or went stable), or already at a limit a reload lowered."""
        due = [key for key, b in self._open.items() if b.deadline <= now or b.is_full]
        return [self._seal(key, now) for key in due]

    def seal_all(self, now: float) -> list[Sealed]:
        return [self._seal(key, now) for key in list(self._open)]

    def open_batches(self) -> dict[WindowKey, OpenBatch]:
        return dict(self._open)

    def _seal(self, key: WindowKey, now: float) -> Sealed:
        name = key[0]
        open_batch = self._open.pop(key)
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

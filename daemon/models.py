"""Small shared types passed between the main process and the workers (all picklable)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

Facts = dict[str, int | float | str]


@dataclass(frozen=True, slots=True)
class IncomingFile:
    """A file claimed into the spool and recorded in the journal."""

    file_id: int
    pipeline: str
    name: str
    spool_path: Path
    sha256: str
    size: int
    received_at: float
    # Taken while a writer still seemed to hold it open (no close event within
    # max_incomplete_s): if it then fails to parse, it is quarantined as "incomplete".
    is_suspect_incomplete: bool = False


@dataclass(frozen=True, slots=True)
class Batch:
    """A sealed batch: what a worker needs to process and publish it."""

    batch_id: str
    pipeline: str
    kind: str
    priority: int
    sealed_at: float
    files: tuple[IncomingFile, ...]
    attempt: int = 1

    @property
    def n_bytes(self) -> int:
        return sum(f.size for f in self.files)


@dataclass(frozen=True, slots=True)
class BatchTask:
    """One attempt at one batch, as handed to an executor."""

    batch: Batch
    options: dict[str, Any]
    outbox_dir: Path
    memory_estimate: int = 0


@dataclass(frozen=True, slots=True)
class OutputFile:
    name: str
    sha256: str
    size: int


@dataclass(frozen=True, slots=True)
class BatchResult:
    """The small summary a worker hands back."""

    batch_id: str
    folder: Path | None
    published_at: float | None
    outputs: tuple[OutputFile, ...] = ()
    facts: dict[int, Facts] = field(default_factory=dict)
    quarantined: dict[int, tuple[str, str]] = field(default_factory=dict)

    @property
    def is_published(self) -> bool:
        return self.folder is not None

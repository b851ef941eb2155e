"""Small shared types passed between the main process and the workers (all picklable)."""

from __future__ import annotations

import enum
import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

Facts = dict[str, int | float | str]


class FileState(enum.StrEnum):
    """A file's row in the journal: received → batched → published | quarantined."""

    CLAIMING = "claiming"
    RECEIVED = "received"
    BATCHED = "batched"
    PUBLISHED = "published"
    QUARANTINED = "quarantined"
    DUPLICATE = "duplicate"


TERMINAL_FILE_STATES = (FileState.PUBLISHED, FileState.QUARANTINED, FileState.DUPLICATE)


class BatchState(enum.StrEnum):
    """A batch's row: open → sealed → running (attempt n) → published | failed (or split)."""

    SEALED = "sealed"
    RUNNING = "running"
    PUBLISHED = "published"
    QUARANTINED = "quarantined"
    FAILED = "failed"
    SPLIT = "split"


class Reason(enum.StrEnum):
    """The service's own reason codes (processors report their own codes as strings)."""

    DISK_FULL = "disk_full"
    IO_ERROR = "io_error"
    EXECUTOR_UNAVAILABLE = "executor_unavailable"
    EXECUTOR_ERROR = "executor_error"
    WORKER_CRASH = "worker_crash"
    TIMEOUT = "timeout"
    AUDIT_UNWRITABLE = "audit_unwritable"
    PIPELINE_REMOVED = "pipeline_removed"
    EVERY_INPUT_QUARANTINED = "every_input_quarantined"
    INTERRUPTED = "interrupted"
    START_FAILED = "start_failed"
    INCOMPLETE = "incomplete"
    DUPLICATE_OF = "duplicate_of"
    # Why intake could not take an inbox entry: one code per cause.
    PERMISSION_DENIED = "permission_denied"  # EACCES/EPERM opening it: left in the inbox
    VANISHED = "vanished"  # ENOENT between the listing and the claim: nothing to account
    CHANGED_AFTER_CHECK = "changed_after_check"  # inode/size/mtime/owner/links moved under us
    SYMLINK = "symlink"  # a link (lstat, or ELOOP from O_NOFOLLOW)
    CLAIM_FAILED = "claim_failed"  # the rename into the spool was refused (EXDEV, EPERM …)
    TOO_LARGE = "too_large"
    HARD_LINK = "hard_link"
    OWNER_NOT_ALLOWED = "owner_not_allowed"
    DIRECTORY = "directory"
    FIFO = "fifo"
    SOCKET = "socket"
    DEVICE = "device"
    NOT_REGULAR_FILE = "not_regular_file"


# A batch_by pipeline's group for files whose header names no series or study.
UNKNOWN_GROUP = "unknown"

# An attempt that failed on these was the disk's fault, not the batch's.
DISK_REASONS = frozenset({Reason.DISK_FULL, Reason.IO_ERROR})


@dataclass(frozen=True, slots=True)
class IncomingFile:
    """A file claimed into the spool and recorded in the journal."""

    file_id: int
    pipeline: str
    name: str
    # A string where the main loop makes it (a Path costs ~3 µs to build and as much again to
    # pickle, per file); the worker makes the Path its processor is given.
    spool_path: str | Path
    sha256: str
    size: int
    received_at: float
    # Taken while a writer still seemed to hold it open (no close event within
    # max_incomplete_s): if it then fails to parse, it is quarantined as "incomplete".
    is_suspect_incomplete: bool = False
    # `batch_by` pipelines: its series or study as a keyed hash ("unknown" if none); else "".
    group: str = ""

    def __reduce__(self) -> tuple[type[IncomingFile], tuple[Any, ...]]:
        # A batch crosses to its worker with thousands of these: the fields as a tuple pickle
        # and load several times faster than a slots dataclass's own state (fields() per file).
        return IncomingFile, self._fields()

    def _fields(self) -> tuple[Any, ...]:
        return (self.file_id, self.pipeline, self.name, self.spool_path, self.sha256, self.size,
                self.received_at, self.is_suspect_incomplete, self.group)  # fmt: skip

    def named(self, name: str) -> IncomingFile:
        """This file under another name (`dataclasses.replace`, without its per-call cost)."""
        _, pipeline, _, *rest = self._fields()
        return IncomingFile(self.file_id, pipeline, name, *rest)


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

    @property
    def group(self) -> str | None:
        """A `batch_by` batch's series or study (keyed hash), or "unknown"; else None."""
        return (self.files[0].group or None) if self.files else None


@dataclass(frozen=True, slots=True)
class BatchTask:
    """One attempt at one batch, as handed to an executor."""

    batch: Batch
    options: dict[str, Any]
    outbox_dir: Path
    memory_estimate: int = 0
    # SHA-256 of the config file the task was built under (its manifest's provenance).
    config_sha256: str = ""
    # The pipeline keeps a rollup: hand back the batch's mergeable statistics.
    wants_rollup: bool = False
    # The journal's WAL, when the batch's seal and running mark were committed without an
    # fsync (local workers): the worker makes it durable before it publishes.
    journal_wal: str | None = None


def options_sha256(options: dict[str, Any]) -> str:
    """SHA-256 of a processor's options as canonical JSON (sorted keys, no spaces)."""
    text = json.dumps(options, sort_keys=True, separators=(",", ":"), ensure_ascii=True)
    return hashlib.sha256(text.encode("ascii")).hexdigest()


@dataclass(frozen=True, slots=True)
class Provenance:
    """What produced a published batch: code version, processor kind and options as used (after
    defaults), the config's hash and the worker's host. Settings only, never patient data."""

    version: str
    kind: str
    options: dict[str, Any]
    config_sha256: str
    host: str

    @property
    def options_sha256(self) -> str:
        return options_sha256(self.options)

    def as_json(self) -> dict[str, Any]:
        return {
            "version": self.version,
            "kind": self.kind,
            "options": self.options,
            "options_sha256": self.options_sha256,
            "config_sha256": self.config_sha256,
            "host": self.host,
        }

    @classmethod
    def from_json(cls, data: Any) -> Provenance | None:
        """The provenance of a manifest written earlier (None if it has none, or not whole)."""
        try:
            return cls(
                str(data["version"]),
                str(data["kind"]),
                dict(data["options"]),
                str(data["config_sha256"]),
                str(data["host"]),
            )
        except (KeyError, TypeError, ValueError):
            return None


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
    provenance: Provenance | None = None
    # The batch's mergeable statistics (plain JSON) for the pipeline's rollup, if it keeps one.
    rollup: dict[str, Any] | None = None

    @property
    def is_published(self) -> bool:
        return self.folder is not None

"""Retention: delete kept copies, finished journal rows and old audit days past their age.

Runs where the journal and the audit log are written: the service's main loop when idle, or
`medbatch prune` holding the instance lock. Each step deletes at most a bounded number of items.
"""

from __future__ import annotations

import contextlib
import enum
import json
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from daemon.audit.events import Record, RetentionPruned
from daemon.audit.names import read_chain_key
from daemon.audit.verify import CHECKPOINT_NAME, FILE_NAME, checkpoint_mac, log_files
from daemon.config import Pipeline, Settings
from daemon.disposal import SIDECAR_SUFFIX, copies_of
from daemon.fsutil import atomic_write, utc_day
from daemon.journal import Journal
from daemon.journal_queries import JournalQueries
from daemon.models import FileState

DAY_S = 86400.0
CHECKPOINT_MODE = 0o640


class PruneKind(enum.StrEnum):
    ARCHIVE = "archive"
    QUARANTINE = "quarantine"
    JOURNAL = "journal"
    AUDIT = "audit"


@dataclass(slots=True)
class Tally:
    """What one kind of one pipeline lost (or would lose): counts and bytes, never names."""

    kind: PruneKind
    pipeline: str | None
    files: int = 0
    bytes: int = 0
    checkpoint_seq: int | None = None

    def record(self) -> RetentionPruned:
        return RetentionPruned(
            kind=self.kind,
            files=self.files,
            bytes=self.bytes,
            pipeline=self.pipeline,
            checkpoint_seq=self.checkpoint_seq,
        )


class _Budget:
    def __init__(self, limit: int | None) -> None:
        self.left = limit

    @property
    def is_spent(self) -> bool:
        return self.left is not None and self.left <= 0

    def take(self) -> None:
        if self.left is not None:
            self.left -= 1


def _size(path: Path) -> int | None:
    try:
        return os.lstat(path).st_size
    except FileNotFoundError:
        return None


class Retention:
    """`plan()` counts what is due (dry run); `step(limit)` deletes up to `limit` items."""

    def __init__(
        self,
        settings: Callable[[], Settings],
        journal: JournalQueries,
        clock: Callable[[], float] = time.time,
    ) -> None:
        """`journal` may be read-only for `plan()`; `step()` needs the writable `Journal`."""
        self._settings = settings
        self._journal = journal
        self._clock = clock
        self.has_more = False

    def _writer(self) -> Journal:
        if not isinstance(self._journal, Journal):
            raise TypeError("Retention.step needs the writable journal, not a read-only one")
        return self._journal

    def plan(self) -> list[Tally]:
        return self._run(_Budget(None), apply=False)

    def step(self, limit: int) -> list[Tally]:
        budget = _Budget(limit)
        tallies = self._run(budget, apply=True)
        self.has_more = budget.is_spent
        return tallies

    def _run(self, budget: _Budget, *, apply: bool) -> list[Tally]:
        settings = self._settings()
        now = self._clock()
        tallies: list[Tally] = []
        self._going: set[int] = set()  # rows whose copies go in this pass (for a dry run)
        for p in settings.pipeline:
            for kind, days, states in (
                (PruneKind.ARCHIVE, p.archive_days, (FileState.PUBLISHED, FileState.DUPLICATE)),
                (PruneKind.QUARANTINE, p.quarantine_days, (FileState.QUARANTINED,)),
            ):
                if days is not None:
                    tally = Tally(kind, p.name)
                    self._copies(p, tally, states, now - days * DAY_S, budget, apply=apply)
                    tallies.append(tally)
            if p.journal_days is not None:
                tally = Tally(PruneKind.JOURNAL, p.name)
                self._rows(p, tally, now - p.journal_days * DAY_S, budget, apply=apply)
                tallies.append(tally)
        if settings.retention.audit_days is not None:
            tally = Tally(PruneKind.AUDIT, None)
            cutoff = utc_day(now - settings.retention.audit_days * DAY_S)
            self._audit(settings.paths.audit, tally, cutoff, budget, apply=apply)
            tallies.append(tally)
        return [t for t in tallies if t.files]

    def _copies(
        self,
        pipeline: Pipeline,
        tally: Tally,
        states: tuple[str, ...],
        before: float,
        budget: _Budget,
        *,
        apply: bool,
    ) -> None:
        settings = self._settings()
        by_name = {p.name: p for p in settings.pipeline}
        due = []
        rows = self._journal.finished_before(
            pipeline.name, states, before, copy_kept=True, limit=budget.left
        )
        for row, facts in rows:
            if budget.is_spent:
                break
            budget.take()
            due.append(row.id)
            self._going.add(row.id)
            for _, path in copies_of(settings.paths, by_name, row, facts):
                targets = [path]
                if row.state == FileState.QUARANTINED:
                    targets.append(path.with_name(path.name + SIDECAR_SUFFIX))
                for target in targets:
                    size = _size(target)
                    if size is None:
                        continue
                    tally.bytes += size
                    tally.files += target == path
                    if apply:
                        target.unlink(missing_ok=True)
                if apply:
                    _remove_if_empty(path.parent)
        if apply and due:
            self._writer().mark_pruned(due, self._clock())

    def _rows(
        self, pipeline: Pipeline, tally: Tally, before: float, budget: _Budget, *, apply: bool
    ) -> None:
        settings = self._settings()
        by_name = {p.name: p for p in settings.pipeline}
        due = []
        states = tuple(s.value for s in FileState)
        rows = self._journal.finished_before(pipeline.name, states, before, copy_kept=False)
        for row, facts in rows:
            if budget.is_spent:
                break
            # A row outlives the copy it describes: `trace` must still explain a kept file.
            copies = copies_of(settings.paths, by_name, row, facts)
            if row.id not in self._going and any(os.path.lexists(p) for _, p in copies):
                continue
            budget.take()
            due.append(row.id)
            tally.files += 1
        if apply and due:
            self._writer().forget_files(due)

    def _audit(
        self, folder: Path, tally: Tally, cutoff_day: str, budget: _Budget, *, apply: bool
    ) -> None:
        # The last file holds the chain's head (the anchor the writer continues): never pruned.
        for path in log_files(folder)[:-1]:
            match = FILE_NAME.fullmatch(path.name)
            if match is None or match[1] >= cutoff_day or budget.is_spent:
                break
            budget.take()
            size = _size(path) or 0
            tally.files += 1
            tally.bytes += size
            if apply:
                seq, digest = _last_line(path)
                # The checkpoint first, added to the earlier ones: a crash before the unlink
                # leaves the day in place, whose chain starts at the previous checkpoint.
                entry: dict[str, object] = {"seq": seq, "hash": digest, "day": match[1]}
                key = read_chain_key(self._settings().paths.state)
                if key is not None:
                    entry["mac"] = checkpoint_mac(key, entry)
                _add_checkpoint(folder, entry)
                path.unlink()
                tally.checkpoint_seq = seq


def _add_checkpoint(folder: Path, entry: dict[str, object]) -> None:
    path = folder / CHECKPOINT_NAME
    try:
        data = json.loads(path.read_bytes())
    except FileNotFoundError:
        data = {"checkpoints": []}
    data["checkpoints"].append(entry)
    text = json.dumps(data, sort_keys=True, indent=1) + "\n"
    atomic_write(path, text.encode("ascii"), CHECKPOINT_MODE)


def _last_line(path: Path) -> tuple[int, str]:
    last = None
    with path.open("rb") as file:
        for raw in file:
            if raw.endswith(b"\n"):
                last = raw
    if last is None:
        raise ValueError(f"{path.name}: no complete line to leave as a checkpoint")
    line = json.loads(last)
    return int(line["seq"]), str(line["hash"])


def _remove_if_empty(folder: Path) -> None:
    with contextlib.suppress(OSError):  # not empty, or already gone
        folder.rmdir()


class Pruner:
    """The service's side: at most one step per `retention.every_s` (sooner while work is left),
    only when nothing is in flight; each tally becomes a `retention.pruned` audit line."""

    def __init__(self, retention: Retention, record: Callable[[Record], object]) -> None:
        self._retention = retention
        self._record = record
        self._next = 0.0

    def maybe_step(self, settings: Settings, *, is_idle: bool) -> None:
        now = time.monotonic()
        if not is_idle or now < self._next:
            return
        for tally in self._retention.step(settings.retention.step_files):
            self._record(tally.record())
        self._next = now + (0.0 if self._retention.has_more else settings.retention.every_s)

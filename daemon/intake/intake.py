"""Intake: decide when an inbox file is complete, check it is safe, and claim it into the spool.

Runs on the main loop. Claiming is: pin and check the entry (claim.py) → journal intent → rename
into the spool → copy or hash → journal. Entries that cannot be taken stay in the inbox, are
reported once and remembered until they change (memory.py).
"""

from __future__ import annotations

import functools
import itertools
import os
import secrets
import signal
import stat
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

import structlog

from daemon.audit import AuditLog, load_name_key
from daemon.audit.events import AuditEvent, FileReceived, FileRejected
from daemon.config import Pipeline, Settings
from daemon.intake import claim, recovery
from daemon.intake.claim import Entry, Lease, Left, NotYet, Refusal, Spooled
from daemon.intake.claimer import Chunk, ClaimerProcess, InProcessClaimer
from daemon.intake.dicom_group import group_for
from daemon.intake.listing import Passes
from daemon.intake.memory import RefusalMemory
from daemon.intake.recovery import Refused
from daemon.intake.refusal import ClaimRules, is_ignored, kind_of, recorded_name, spool_suffix
from daemon.intake.settle import Candidate, Candidates, settled, signature_of
from daemon.journal import Journal
from daemon.models import IncomingFile, Reason

log = structlog.get_logger()

# Files claimed per main-loop step: two journal commits each chunk, so batching them keeps the
# fsyncs few, while a bounded chunk keeps the loop responsive to everything else.
CLAIM_CHUNK = 500
# Chunks the claimer may hold at once: one it works on, the next waiting for it.
CHUNKS_HELD = 2
# How soon to look again at a file someone holds open for writing (its close event is sooner).
BUSY_RETRY_S = 1.0
# Candidates a rescan may hold at once (about 300 bytes each): a producer who drops a million
# files costs bounded memory; the rest are found when the backlog drains.
MAX_PENDING = 10_000


@dataclass(frozen=True, slots=True)
class _Plan:
    """What the main loop keeps of a claim it sent (the claimer gets its `Entry`)."""

    pipeline: Pipeline
    candidate: Candidate
    name: str  # recorded_name(candidate.name)
    spool_name: str
    received_at: float
    is_settled: bool


_Claim = tuple[Entry, _Plan]


class Intake:
    def __init__(
        self,
        settings: Settings,
        journal: Journal,
        audit: AuditLog,
        clock: Callable[[], float] = time.time,
        monotonic: Callable[[], float] = time.monotonic,
        claimer: ClaimerProcess | InProcessClaimer | None = None,
    ) -> None:
        self._journal = journal
        self.claimer = InProcessClaimer() if claimer is None else claimer
        self._claiming: dict[int, list[_Claim]] = {}  # chunks sent, not back yet
        self._chunk_ids = itertools.count()
        self._audit = audit
        self._clock = clock
        self._monotonic = monotonic
        self._candidates = Candidates()
        self._refused = RefusalMemory()
        self._passes = Passes()  # inbox listings the cap on candidates cut short
        self._service_uid = os.geteuid()
        if threading.current_thread() is threading.main_thread():
            # A writer opening a file we hold leased sends us SIGIO, which would end the process.
            signal.signal(signal.SIGIO, signal.SIG_IGN)
        self.reconfigure(settings)

    def reconfigure(self, settings: Settings) -> None:
        self._settings = settings
        self._pipelines: Mapping[str, Pipeline] = {p.name: p for p in settings.pipeline}
        self._spool = settings.paths.spool
        self._spool_prefix = f"{self._spool}{os.sep}"  # plain strings in the per-file path
        # The UIDs that group batch_by pipelines are kept as keyed hashes, like names.
        grouped = any(p.is_grouped for p in settings.pipeline)
        self._group_key = load_name_key(settings.paths.state) if grouped else None
        for name in self._pipelines:
            (self._spool / name).mkdir(parents=True, exist_ok=True, mode=0o750)
        self._candidates.drop_pipelines_except(set(self._pipelines))
        self._passes.keep_only(set(self._pipelines))
        self._refused.forget_pipelines_except(self._pipelines)

    @property
    def pending(self) -> int:
        """Candidates waiting, plus one while a pass cut short by the cap left entries unlisted."""
        return len(self._candidates) + int(bool(self._passes))

    @property
    def left_in_inbox(self) -> int:
        """Entries now in an inbox that intake saw but could not take (reported once each)."""
        return len(self._refused)

    # -- candidates -----------------------------------------------------------------------

    def offer(self, pipeline: str, path: Path, *, is_writing: bool | None = None) -> None:
        """A path seen by an event. `is_writing` is True after a modify event and False after
        a close or a rename-in; None (a create) leaves it as it was.

        A file whose first event is a close or a rename-in was written elsewhere and renamed
        in: complete unless a writer still holds it, which the lease tells, so no settle wait.
        One written in place (its first event a create) keeps the settle rule even when closed:
        a writer may reopen it to add more.
        """
        if pipeline not in self._pipelines or is_ignored(path.name):
            return
        now = self._monotonic()
        settle_s = self._pipelines[pipeline].settle_s
        key = os.fspath(path)
        candidate = self._candidates.get(key)
        if candidate is None:
            try:
                st = os.lstat(key)
            except OSError:
                return
            if self._refused.is_unchanged(pipeline, path.name, st):
                return
            self._refused.forget(pipeline, path.name)  # changed: examined afresh
            candidate = Candidate(pipeline, key, signature_of(st), now, now + settle_s)
            candidate.is_closed_hint = is_writing is False
            self._candidates.add(candidate)
        candidate.is_urgent = True
        if is_writing is not None:
            candidate.is_writing = is_writing
        if is_writing:
            candidate.stable_since = now
            self._candidates.schedule(candidate, now + settle_s)
        elif is_writing is False and candidate.is_closed_hint:
            self._candidates.schedule(candidate, now)
        else:
            self._candidates.schedule(candidate, candidate.due)

    def scan(self) -> int:
        """Offer every new entry of every inbox (start-up and the periodic rescan), skipping
        refused ones that did not change; count new candidates. At `MAX_PENDING` candidates
        the pass stops, and the next scan goes on from there."""
        before = len(self._candidates)
        now = self._monotonic()
        for name, pipeline in self._pipelines.items():
            seen = self._passes.go_on(
                name,
                self._settings.paths.inbox / name,
                functools.partial(self._scan_entry, pipeline, now=now),
                lambda: len(self._candidates) >= MAX_PENDING,
                functools.partial(self._refused.knows, name),
            )
            if seen is not None:
                self._refused.keep_only(name, seen)
        return len(self._candidates) - before

    def _scan_entry(self, pipeline: Pipeline, entry: os.DirEntry[str], *, now: float) -> None:
        if is_ignored(entry.name):
            return
        # A refused entry costs a dict look-up (a link keeps its inode: not even an lstat).
        try:
            if self._refused.inode(pipeline.name, entry.name) == entry.inode() and (
                entry.is_symlink()
                or self._refused.is_unchanged(
                    pipeline.name, entry.name, entry.stat(follow_symlinks=False)
                )
            ):
                return
            path = entry.path
            if path in self._candidates:
                return
            # With nothing to wait for, there is no size or time to compare later: the listing's
            # file type and inode do (no lstat a file on a backlog); the claim checks the rest.
            is_plain = pipeline.settle_s == 0 and entry.is_file(follow_symlinks=False)
            st = None if is_plain else entry.stat(follow_symlinks=False)  # cached by the entry
        except OSError:
            return
        self._refused.forget(pipeline.name, entry.name)  # new or changed: examined afresh
        if st is not None and not stat.S_ISREG(st.st_mode):  # waiting cannot make it a file
            self._refuse_in_inbox(pipeline.name, entry.name, Refusal(kind_of(st.st_mode), st=st))
            return
        signature = (entry.inode(), -1, -1) if st is None else signature_of(st)
        due = now + pipeline.settle_s
        self._candidates.add(Candidate(pipeline.name, path, signature, now, due))

    def next_due(self, *, is_paused: bool) -> float | None:
        """When the next candidate may be claimed; None while paused or the claimer is full:
        the loop then waits for a message (a chunk back, a publish, a tick), never spinning."""
        is_blocked = is_paused or len(self._claiming) >= CHUNKS_HELD
        return None if is_blocked else self._candidates.next_due()

    # -- claiming -------------------------------------------------------------------------

    def step(self, *, is_paused: bool) -> list[IncomingFile]:
        """The main loop's turn: what the claimer finished, in the spool and journal; unless
        intake is paused, the claimer kept busy (the next chunk is sent before this one is
        journaled, and another after)."""
        if not is_paused:
            self.send_settled()
        taken = self.collect()
        if not is_paused:
            self.send_settled()
        return taken

    def take_settled(self, limit: int = CLAIM_CHUNK) -> list[IncomingFile]:
        """Send settled candidates to be claimed, then take what came back (with the in-process
        claimer, that same chunk): the files now in the spool and journal."""
        self.send_settled(limit)
        return self.collect()

    def send_settled(self, limit: int = CLAIM_CHUNK) -> None:
        """Claim settled candidates, at most `limit` (the main loop comes back for the rest, so
        batches seal and start while a large backlog is still being claimed): their intent
        rows are committed, then the claimer gets them. At most `CHUNKS_HELD` at a time."""
        if len(self._claiming) >= CHUNKS_HELD:
            return
        if self._passes and len(self._candidates) < MAX_PENDING // 2:
            self.scan()  # the rest of a pass the cap cut short, now that the backlog drained
        ready = settled(self._candidates, self._pipelines, self._monotonic(), limit)
        if not ready:
            return
        now = self._clock()
        plans = []
        for c, is_settled in ready:
            c.is_claiming = True
            plans.append(_Plan(self._pipelines[c.pipeline], c, recorded_name(c.name),
                               _spool_name(c.pipeline, c.name), now, is_settled))  # fmt: skip
        rows = [(p.pipeline.name, p.name, p.spool_name, p.received_at) for p in plans]
        ids = self._journal.begin_claims(rows, durable=False)  # the claimer syncs it first
        claims = [(Entry(i, p.pipeline.name, p.candidate.name,
                         f"{self._spool_prefix}{p.spool_name}", p.is_settled), p)
                  for i, p in zip(ids, plans, strict=True)]  # fmt: skip
        chunk_id = next(self._chunk_ids)
        self._claiming[chunk_id] = claims
        used = {p.pipeline.name: p.pipeline for p in plans}
        pipelines = {name: ClaimRules.of(pipeline) for name, pipeline in used.items()}
        entries = [e for e, _ in claims]
        inbox, wal = self._settings.paths.inbox, self._journal.wal_path
        self.claimer.submit(Chunk(chunk_id, inbox, pipelines, entries, journal_wal=wal))

    @property
    def is_claiming(self) -> bool:
        return bool(self._claiming)

    def collect(self) -> list[IncomingFile]:
        """The files of the chunks the claimer finished, now in the spool and journal; a chunk
        it died holding is finished here, as recovery finishes an interrupted claim."""
        taken: list[IncomingFile] = []
        for chunk_id, outcomes in self.claimer.take_finished():
            claims = self._claiming.pop(chunk_id)
            if outcomes is None:
                outcomes = [claim.finish_lost(e, p.pipeline) for e, p in claims]
            taken += self._apply(claims, outcomes)
        return taken

    def close(self) -> None:
        """Stop: the chunks the claimer holds come back and are journaled (their files wait in
        the journal for the next start's batches)."""
        self.claimer.close()
        self.collect()

    def _apply(self, claims: list[_Claim], outcomes: list[claim.Outcome]) -> list[IncomingFile]:
        received, dropped, refused, taken = [], [], [], []
        groups: dict[int, str] = {}
        for (entry, plan), outcome in zip(claims, outcomes, strict=True):
            file_id, c = entry.file_id, plan.candidate
            if isinstance(outcome, NotYet):
                dropped.append(file_id)
                self._look_again(plan, outcome)
                continue
            self._candidates.remove(c.path, c)
            if isinstance(outcome, Left):
                dropped.append(file_id)
                self._refuse_in_inbox(plan.pipeline.name, entry.raw_name, outcome.refusal)
            elif isinstance(outcome, Spooled):
                if outcome.swapped:
                    _log_refusal("file.swapped", plan.pipeline.name, outcome.refusal,
                                 c.signature[0])  # fmt: skip
                refused.append(Refused(file_id, plan.pipeline.name, plan.name, plan.spool_name,
                                       outcome.refusal.reason))  # fmt: skip
            else:
                spool_path = entry.spool_path
                received.append((file_id, outcome.sha256, outcome.size))
                group = group_for(plan.pipeline, spool_path, self._group_key)
                if group:
                    groups[file_id] = group
                taken.append(IncomingFile(file_id, plan.pipeline.name, plan.name, spool_path,
                                          outcome.sha256, outcome.size, plan.received_at,
                                          bool(c.is_writing), group))  # fmt: skip
        self._journal.finish_claims(
            received, dropped, [(r.file_id, "", 0, r.reason) for r in refused], groups
        )
        self._audit.record_many(
            [
                FileReceived(
                    pipeline=f.pipeline,
                    file=f.name,
                    sha256=f.sha256,
                    size=f.size,
                    file_id=f.file_id,
                )
                for f in taken
            ]
        )
        recovery.quarantine_refused(refused, self._settings, self._audit, self._journal)
        return taken

    def _look_again(self, plan: _Plan, outcome: NotYet) -> None:
        """Not taken now, still a candidate: when to look again."""
        c, pipeline = plan.candidate, plan.pipeline
        c.is_claiming = False
        if self._candidates.get(c.path) is not c:
            return  # dropped meanwhile (its pipeline removed by a reload)
        again = self._monotonic()
        if outcome.lease is Lease.UNAVAILABLE:
            c.is_closed_hint = False  # no kernel word on writers: the settle rule decides
            again = max(again, c.stable_since + pipeline.settle_s)
        else:
            again += max(pipeline.settle_s, BUSY_RETRY_S)
            if outcome.lease is Lease.BUSY:
                log.debug("intake.busy", pipeline=pipeline.name, inode=outcome.inode)
        self._candidates.schedule(c, again)

    def _refuse_in_inbox(self, pipeline: str, raw_name: str, refused: Refusal) -> None:
        """Leave the entry alone and report it once; remember it until it changes."""
        if refused.reason == Reason.VANISHED:
            log.info("intake.vanished", pipeline=pipeline, reason=refused.reason,
                     errno=refused.errno_name)  # fmt: skip
            return
        st = refused.st
        if st is not None:
            self._refused.remember(pipeline, raw_name, st, refused.reason)
        inode, size = (st.st_ino, st.st_size) if st is not None else (0, 0)
        name = recorded_name(raw_name)
        if self._journal.record_rejected(pipeline, name, inode, refused.reason, self._clock()):
            rejected = FileRejected(pipeline=pipeline, file=name, reason=refused.reason, size=size)
            self._audit.record(rejected)
            _log_refusal(AuditEvent.FILE_REJECTED, pipeline, refused, inode)

    # -- recovery -------------------------------------------------------------------------

    def adopt_orphans(self) -> int:
        """Recovery: spooled files the journal does not know become claims again."""
        return recovery.adopt_orphans(self._journal, self._spool, self._pipelines)

    def finish_interrupted_claims(self) -> list[IncomingFile]:
        """Recovery: claims whose journal intent was written but not their outcome."""
        args = (self._settings, self._pipelines, self._audit, self._service_uid, self._group_key)
        return recovery.finish_interrupted_claims(self._journal, *args)


# A spool name is the claim's time and a per-process sequence from a random start: unique, and
# without a getrandom() call per file.
_SPOOL_SEQ = itertools.count(secrets.randbits(32))


def _spool_name(pipeline: str, raw_name: str) -> str:
    return (
        f"{pipeline}/{time.time_ns():x}-{next(_SPOOL_SEQ) & 0xFFFFFFFF:08x}{spool_suffix(raw_name)}"
    )


def _log_refusal(event: str, pipeline: str, refused: Refusal, inode: int) -> None:
    # Never the name: only the reason code, the errno's name and the inode.
    log.warning(
        event, pipeline=pipeline, reason=refused.reason, errno=refused.errno_name, inode=inode
    )

"""A big batch read on every idle worker (issue 13.3): its files in shares of about equal bytes,
each read on a worker of its own, then one task merges the partials and publishes."""

from __future__ import annotations

import functools
import threading
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from concurrent.futures.process import BrokenProcessPool
from typing import Any

from daemon.models import BatchResult, BatchTask, IncomingFile
from daemon.processors import options_model
from daemon.worker import finish_batch, read_part

# A batch this big is read on every idle worker, in shares of about equal bytes: below it, the
# extra tasks and the partials' trip through the main process cost more than they save.
SPLIT_MIN_BYTES = 32 << 20

Relay = Callable[["Future[Any]"], None]
Schedule = Callable[..., "Future[Any]"]  # (function, *args) → the task's future


def shares(files: Sequence[IncomingFile], parts: int) -> list[tuple[int, ...]]:
    """File ids in at most `parts` contiguous shares of about equal bytes. Contiguous, so the
    shares' partials put end to end are in the order one worker reading them all gives."""
    parts = min(parts, len(files))
    total = sum(f.size for f in files)
    if parts < 2 or total <= 0:
        return [tuple(f.file_id for f in files)]
    out: list[list[int]] = [[] for _ in range(parts)]
    before = 0
    for f in files:
        out[min(parts - 1, before * parts // total)].append(f.file_id)
        before += f.size
    return [tuple(share) for share in out if share]


@functools.cache
def reads_files_apart(kind: str) -> bool:
    """Whether a batch of this kind may be read in shares (its options model says)."""
    return bool(getattr(options_model(kind), "reads_files_apart", True))


def run_split(
    schedule: Schedule, task: BatchTask, parts: list[tuple[int, ...]], relay: Relay
) -> None:
    """Each share read on its own worker; when all are read, one task merges and publishes.
    The first share to fail (a dead worker, a timeout) is the attempt's outcome."""
    reads: list[Future[tuple[list[Any], list[Any]]]] = [
        schedule(read_part, task, ids) for ids in parts
    ]
    left = [len(reads)]
    count_lock = threading.Lock()

    def on_read(_: Future[Any]) -> None:
        with count_lock:
            left[0] -= 1
            if left[0]:
                return
        failed = next((r for r in reads if r.cancelled() or r.exception() is not None), None)
        if failed is not None:
            relay(failed)
            return
        partials: list[Any] = []
        outcomes: list[Any] = []
        for r in reads:
            read, told = r.result()
            partials += read
            outcomes += told
        final: Future[BatchResult]
        try:
            final = schedule(finish_batch, task, partials, outcomes)
        except (RuntimeError, OSError):
            final = Future()
            final.set_exception(BrokenProcessPool("pool stopped between the shares"))
        final.add_done_callback(relay)

    for r in reads:
        r.add_done_callback(on_read)

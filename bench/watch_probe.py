"""A bare watchdog observer under the latency section's drop pattern: how long a write-then-rename
takes to arrive as an event, with and without a claim (a rename out of the folder) in between.

watchdog holds an IN_MOVED_FROM for 0.5 s to pair it with its IN_MOVED_TO
(`InotifyMoveEventGrouper.delay`), and its queue is FIFO, so a file moved *out* of a watched
folder delays every later event of that folder (gorakhargosh/watchdog#649).
"""

from __future__ import annotations

import contextlib
import logging
import os
import queue
import time
from pathlib import Path

from watchdog.events import FileMovedEvent, FileSystemEvent, FileSystemEventHandler
from watchdog.observers import Observer

EVENT_TIMEOUT_S = 5.0
CLAIM_AFTER_S = 0.1  # as the service: settle, then claim
NEXT_DROP_AFTER_S = 0.05  # as the latency section: the next drop soon after


class _MovedIn(FileSystemEventHandler):
    def __init__(self, seen: queue.SimpleQueue[float]) -> None:
        self._seen = seen

    def on_any_event(self, event: FileSystemEvent) -> None:
        if isinstance(event, FileMovedEvent) and str(event.dest_path).endswith(".csv"):
            self._seen.put(time.perf_counter())


def probe_watchdog(root: Path, n_drops: int, *, is_claimed: bool) -> list[float]:
    """Milliseconds from each rename into the folder to its moved event."""
    folder, spool = root / "inbox", root / "spool"
    folder.mkdir(parents=True)
    spool.mkdir()
    seen: queue.SimpleQueue[float] = queue.SimpleQueue()
    # Stopping an observer logs "queue_events() called when the thread is inactive" as an error.
    logging.getLogger("watchdog").setLevel(logging.CRITICAL)
    observer = Observer()
    observer.schedule(_MovedIn(seen), str(folder), recursive=False)
    observer.start()
    delays = []
    try:
        for i in range(n_drops):
            tmp = folder / f".probe-{i}.part"
            tmp.write_bytes(b"x" * 1000)
            started = time.perf_counter()
            os.rename(tmp, folder / f"probe-{i}.csv")
            with contextlib.suppress(queue.Empty):
                delays.append((seen.get(timeout=EVENT_TIMEOUT_S) - started) * 1000)
            time.sleep(CLAIM_AFTER_S)
            if is_claimed:
                os.rename(folder / f"probe-{i}.csv", spool / f"probe-{i}.csv")
            time.sleep(NEXT_DROP_AFTER_S)
    finally:
        observer.stop()
        observer.join(timeout=5)
    return delays

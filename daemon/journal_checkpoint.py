"""The journal's WAL checkpoints, on a thread of their own.

A checkpoint copies the WAL's pages into the database and fsyncs both files: tens of
milliseconds on a busy disk. SQLite runs it inside whichever commit crosses its threshold, which
made the main loop wait for it, and on a backlog it ran every ~1000 pages (a few times a
second). The journal's connection therefore never checkpoints (`wal_autocheckpoint=0`). Once
its WAL has grown past `START_BYTES`, this thread takes over: at most every `INTERVAL_S`, if
anything was committed meanwhile, a PASSIVE checkpoint on a connection of its own (it never
blocks the writer; SQLite releases the GIL meanwhile). A small journal (most tests') never
starts the thread; closing the journal checkpoints what is left.
"""

from __future__ import annotations

import os
import sqlite3
import threading
from pathlib import Path

import structlog

log = structlog.get_logger()

START_BYTES = 1000 * 4096  # SQLite's own threshold: 1000 pages of 4 KiB
INTERVAL_S = 1.0


class Checkpointer:
    def __init__(self, path: Path, wal_path: str) -> None:
        self._path = path
        self._wal_path = wal_path
        self._due = threading.Event()  # something was committed since the last checkpoint
        self._stopping = threading.Event()
        self._thread: threading.Thread | None = None
        self.done = 0  # checkpoints run

    def committed(self) -> None:
        """After each commit (main loop)."""
        if self._thread is None:
            try:
                if os.stat(self._wal_path).st_size < START_BYTES:
                    return
            except FileNotFoundError:
                return
            self._thread = threading.Thread(
                target=self._run, name="medbatch-journal-checkpoint", daemon=True
            )
            self._thread.start()
        self._due.set()

    def close(self) -> None:
        """Stop the thread (a checkpoint under way finishes first)."""
        if self._thread is None:
            return
        self._stopping.set()
        self._due.set()
        self._thread.join()
        self._thread = None

    def _run(self) -> None:
        db = sqlite3.connect(self._path, isolation_level=None, timeout=30.0)
        try:
            while self._due.wait() and not self._stopping.is_set():
                self._due.clear()
                try:
                    db.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchall()
                    self.done += 1
                except sqlite3.Error as exc:  # tried again after the next commit
                    log.warning("journal.checkpoint_failed", error=type(exc).__name__)
                self._stopping.wait(INTERVAL_S)  # commits meanwhile wait for the next one
        finally:
            db.close()

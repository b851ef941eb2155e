"""What `run --once` prints: a progress line on a terminal, and the closing summary on stdout."""

from __future__ import annotations

import sys
import time

from daemon.outcome_listeners import Progress


class OnceConsole:
    def __init__(self, progress: Progress) -> None:
        self._progress = progress
        self._is_tty = sys.stderr.isatty()

    def report(self) -> None:
        """Rewrite the progress line (terminals only: journald must not get a line per step)."""
        if not self._is_tty:
            return
        p = self._progress
        elapsed = max(time.monotonic() - p.started, 1e-6)
        sys.stderr.write(
            f"\r{p.files_taken} files taken, {p.published} batches published, "
            f"{p.quarantined} quarantined, {p.files_taken / elapsed:.0f} files/s "
        )
        sys.stderr.flush()

    def summary(self, unfinished: int, left_in_inbox: int) -> None:
        p = self._progress
        if self._is_tty:
            sys.stderr.write("\n")
        elapsed = time.monotonic() - p.started
        print(
            f"medbatch: {p.files_taken} files taken, {p.published} batches published, "
            f"{p.quarantined} files quarantined, {unfinished} unfinished, "
            f"{left_in_inbox} left in the inbox, in {elapsed:.1f} s"
        )

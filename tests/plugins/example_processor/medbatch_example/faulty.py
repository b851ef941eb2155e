"""`kind = "faulty"`: linecount with magic words that break its own worker (tests only).

A file containing `MEDBATCH-TEST-CRASH` kills the worker with SIGKILL while it is read,
`MEDBATCH-TEST-SEGV` segfaults it, `MEDBATCH-TEST-HANG` sleeps forever (deaf to SIGTERM, like a
worker stuck in C code), `MEDBATCH-TEST-SLEEP-<seconds>` is merely slow, and
`MEDBATCH-TEST-WRITE-CRASH` kills the worker after it wrote its result into the staging folder
(before the publish). Runs in worker processes.

While the file that `MEDBATCH_TEST_BROKEN_START` names exists, the module fails to import in a
worker process (the service's own import is untouched): no worker of the pool can start.
"""

from __future__ import annotations

import ctypes
import multiprocessing
import os
import re
import signal
import time
from collections.abc import Sequence
from pathlib import Path
from typing import ClassVar

from daemon.processors.base import Facts
from medbatch_example.linecount import LineCountOptions, LineCountProcessor

_BROKEN_START = os.environ.get("MEDBATCH_TEST_BROKEN_START")
if _BROKEN_START and multiprocessing.parent_process() is not None and os.path.exists(_BROKEN_START):
    raise ImportError("faulty: a worker's start-up broken on purpose")

CRASH = b"MEDBATCH-TEST-CRASH"
SEGV = b"MEDBATCH-TEST-SEGV"
HANG = b"MEDBATCH-TEST-HANG"
WRITE_CRASH = b"MEDBATCH-TEST-WRITE-CRASH"
SLEEP = re.compile(rb"MEDBATCH-TEST-SLEEP-([0-9]+(?:\.[0-9]+)?)")

# (lines, crash once written): the flag travels with the data, as the processor is reused.
Partial = tuple[int, bool]


class FaultyOptions(LineCountOptions):
    pass


class FaultyProcessor(LineCountProcessor):
    kind: ClassVar[str] = "faulty"
    Options: ClassVar[type[LineCountOptions]] = FaultyOptions

    def read(self, path: Path, name: str) -> tuple[Partial, Facts]:  # type: ignore[override]
        data = path.read_bytes()
        if CRASH in data:
            os.kill(os.getpid(), signal.SIGKILL)
        if SEGV in data:
            ctypes.string_at(0)  # reads address 0: SIGSEGV
        if HANG in data:
            signal.signal(signal.SIGTERM, signal.SIG_IGN)
            while True:
                time.sleep(3600)
        match = SLEEP.search(data)
        if match:
            time.sleep(float(match[1]))
        lines, facts = super().read(path, name)
        return (lines, WRITE_CRASH in data), facts

    def merge(self, partials: Sequence[Partial]) -> Partial:  # type: ignore[override]
        return sum(p[0] for p in partials), any(p[1] for p in partials)

    def write(self, merged: Partial, folder: Path) -> list[str]:  # type: ignore[override]
        names = super().write(merged[0], folder)
        if merged[1]:
            os.kill(os.getpid(), signal.SIGKILL)
        return names

"""`kind = "faulty"`: linecount with magic words that break its own worker (tests only).

A file containing `MEDBATCH-TEST-CRASH` kills the worker with SIGKILL, `MEDBATCH-TEST-SEGV`
segfaults it, `MEDBATCH-TEST-HANG` sleeps forever. Runs in worker processes.
"""

from __future__ import annotations

import ctypes
import os
import signal
import time
from pathlib import Path
from typing import ClassVar

from daemon.processors.base import Facts
from medbatch_example.linecount import LineCountOptions, LineCountProcessor

CRASH = b"MEDBATCH-TEST-CRASH"
SEGV = b"MEDBATCH-TEST-SEGV"
HANG = b"MEDBATCH-TEST-HANG"


class FaultyOptions(LineCountOptions):
    pass


class FaultyProcessor(LineCountProcessor):
    kind: ClassVar[str] = "faulty"
    Options: ClassVar[type[LineCountOptions]] = FaultyOptions

    def read(self, path: Path, name: str) -> tuple[int, Facts]:
        data = path.read_bytes()
        if CRASH in data:
            os.kill(os.getpid(), signal.SIGKILL)
        if SEGV in data:
            ctypes.string_at(0)  # reads address 0: SIGSEGV
        if HANG in data:
            while True:
                time.sleep(3600)
        return super().read(path, name)

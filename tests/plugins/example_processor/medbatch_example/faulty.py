"""`kind = "faulty"`: linecount with magic words that break its own worker (tests only).

A file containing `MEDBATCH-TEST-CRASH` kills the worker with SIGKILL, `MEDBATCH-TEST-SEGV`
segfaults it, `MEDBATCH-TEST-HANG` sleeps forever (deaf to SIGTERM, like a worker stuck in C
code), `MEDBATCH-TEST-SLEEP-<seconds>` is merely slow. Runs in worker processes.
"""

from __future__ import annotations

import ctypes
import os
import re
import signal
import threading
import time
from pathlib import Path
from typing import ClassVar

from daemon.processors.base import Facts
from medbatch_example.linecount import LineCountOptions, LineCountProcessor

CRASH = b"MEDBATCH-TEST-CRASH"
SEGV = b"MEDBATCH-TEST-SEGV"
HANG = b"MEDBATCH-TEST-HANG"
SLEEP = re.compile(rb"MEDBATCH-TEST-SLEEP-([0-9]+(?:\.[0-9]+)?)")


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
            if threading.current_thread() is threading.main_thread():  # not so on a Dask worker
                signal.signal(signal.SIGTERM, signal.SIG_IGN)
            while True:
                time.sleep(3600)
        match = SLEEP.search(data)
        if match:
            time.sleep(float(match[1]))
        return super().read(path, name)

"""CPU seconds of a process and its descendants, from /proc/<pid>/stat (utime + stime)."""

from __future__ import annotations

import contextlib
import os
import threading
from pathlib import Path

CLOCK_TICKS_PER_S = os.sysconf("SC_CLK_TCK")


def descendants(pid: int) -> list[int]:
    """Child processes of every thread of `pid`, recursively (pool workers, resource tracker)."""
    found: list[int] = []
    stack = [pid]
    while stack:
        parent = stack.pop()
        with contextlib.suppress(OSError):
            for task in os.listdir(f"/proc/{parent}/task"):
                with contextlib.suppress(OSError):
                    text = Path(f"/proc/{parent}/task/{task}/children").read_text()
                    for child in (int(p) for p in text.split()):
                        if child not in found:
                            found.append(child)
                            stack.append(child)
    return found


def cpu_ticks(pid: int) -> tuple[int, int]:
    """(utime + stime of the process, cutime + cstime of its reaped children), in clock ticks."""
    text = Path(f"/proc/{pid}/stat").read_text()
    fields = text[text.rindex(")") + 2 :].split()
    # fields[0] is field 3 (state) of proc(5): utime=14, stime=15, cutime=16, cstime=17.
    return int(fields[11]) + int(fields[12]), int(fields[13]) + int(fields[14])


class CpuSampler:
    """Polls the CPU ticks of a process and its descendants until stopped, keeping each
    process's last reading, so that CPU used by processes that have exited is still counted
    (to within one interval). Counts from the first reading: a process already running (a Dask
    worker) is charged only for what it uses while sampled."""

    def __init__(self, pid: int, interval_s: float = 0.1) -> None:
        self.pid = pid
        self._interval_s = interval_s
        self._first: dict[int, int] = {}
        with contextlib.suppress(OSError, ValueError, IndexError):
            self._first = tree_ticks(pid)
        self._last: dict[int, int] = dict(self._first)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="cpu-sampler", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            with contextlib.suppress(OSError, ValueError, IndexError):
                self._last.update(tree_ticks(self.pid))
            self._stop.wait(self._interval_s)

    def stop(self) -> tuple[float, float]:
        """(CPU seconds of the main process, of all its descendants)."""
        self._stop.set()
        self._thread.join(timeout=5)
        ticks = {pid: n - self._first.get(pid, 0) for pid, n in self._last.items()}
        main = ticks.pop(self.pid, 0)
        ticks.pop(-1, None)  # reaped children are already counted by their own last reading
        return main / CLOCK_TICKS_PER_S, sum(ticks.values()) / CLOCK_TICKS_PER_S


def tree_ticks(pid: int) -> dict[int, int]:
    """Own CPU ticks of `pid` and each live descendant; key -1 holds `pid`'s reaped children."""
    own, reaped = cpu_ticks(pid)
    ticks = {pid: own, -1: reaped}
    for child in descendants(pid):
        with contextlib.suppress(OSError, ValueError, IndexError):
            ticks[child] = cpu_ticks(child)[0]
    return ticks

"""Per-process peak memory (VmHWM) and CPU seconds of a service and each of its descendants,
polled from /proc while it runs: which worker peaked where, and whether both cores worked."""

from __future__ import annotations

import contextlib
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from bench.cpu import CLOCK_TICKS_PER_S, cpu_ticks, descendants


@dataclass(frozen=True)
class ProcStat:
    pid: int
    role: str  # "main", "worker", "claimer", "mover" or "helper" (resource tracker, fork server)
    peak_rss_mib: float
    cpu_s: float
    series: tuple[tuple[float, int], ...] = ()  # (epoch seconds, CPU ticks) at each sample

    def cpu_s_between(self, start: float, end: float) -> float:
        """CPU seconds used from `start` to `end` (epoch), to within one sampling interval."""
        before = [ticks for at, ticks in self.series if at <= start]
        upto = [ticks for at, ticks in self.series if at <= end]
        first = before[-1] if before else 0
        return max((upto[-1] if upto else 0) - first, 0) / CLOCK_TICKS_PER_S


def _hwm_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1])
    return 0


def _role(pid: int, root: int) -> str:
    """main; worker (a pool worker: a child of the fork server, or a Dask worker); claimer;
    mover (the archive renames); helper (multiprocessing's resource tracker and fork server)."""
    if pid == root:
        return "main"
    with contextlib.suppress(OSError):
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
        parent = int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
        if b"daemon.intake.claimer" in cmdline:
            return "mover" if cmdline.rstrip(b"\0").endswith(b"disposal.mover") else "claimer"
        if b"resource_tracker" in cmdline or (b"forkserver" in cmdline and parent == root):
            return "helper"
    return "worker"


class ProcessSampler:
    """Polls `pid` and its descendants until stopped, keeping each process's last reading, so a
    worker that has exited still counts (to within one interval)."""

    def __init__(self, pid: int, interval_s: float = 0.05) -> None:
        self.pid = pid
        self._interval_s = interval_s
        self._hwm: dict[int, int] = {}
        self._ticks: dict[int, int] = {}
        self._series: dict[int, list[tuple[float, int]]] = {}
        self._roles: dict[int, str] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="proc-sampler", daemon=True)
        self._thread.start()

    def _sample(self) -> None:
        for pid in (self.pid, *descendants(self.pid)):
            with contextlib.suppress(OSError, ValueError, IndexError):
                self._hwm[pid] = max(self._hwm.get(pid, 0), _hwm_kib(pid))
                self._ticks[pid] = cpu_ticks(pid)[0]
                self._series.setdefault(pid, []).append((time.time(), self._ticks[pid]))
                if pid not in self._roles:
                    self._roles[pid] = _role(pid, self.pid)

    def _run(self) -> None:
        while not self._stop.is_set():
            self._sample()
            self._stop.wait(self._interval_s)

    def stop(self) -> list[ProcStat]:
        self._stop.set()
        self._thread.join(timeout=5)
        return [
            ProcStat(
                pid,
                self._roles.get(pid, "worker"),
                round(self._hwm.get(pid, 0) / 1024, 1),
                round(self._ticks.get(pid, 0) / CLOCK_TICKS_PER_S, 2),
                tuple(self._series.get(pid, ())),
            )
            for pid in sorted(self._hwm)
        ]


def role(stats: list[ProcStat], name: str) -> list[ProcStat]:
    return [s for s in stats if s.role == name]

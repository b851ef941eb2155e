"""The health rule: is the service running, and healthy, going by the heartbeat in its journal.

One function for `medbatch status` and for `/healthz`, so both always give the same answer.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

# A heartbeat older than this many intervals (plus the slack) means the main loop is stuck.
STALE_HEARTBEATS = 3
STALE_SLACK_S = 5.0
DEFAULT_HEARTBEAT_S = 5.0

MetaReader = Callable[[str], Any]


@dataclass(frozen=True, slots=True)
class Verdict:
    running: bool
    healthy: bool
    pid: int | None = None
    heartbeat_age_s: float | None = None
    problem: str | None = None

    @property
    def state(self) -> str:
        if not self.running:
            return "not running"
        return "running" if self.healthy else "degraded"

    def as_dict(self) -> dict[str, Any]:
        return {
            "state": self.state,
            "running": self.running,
            "healthy": self.healthy,
            "pid": self.pid,
            "heartbeat_age_s": self.heartbeat_age_s,
            "problem": self.problem,
        }


NOT_STARTED = Verdict(
    running=False,
    healthy=False,
    problem="no journal yet: the service has never run with this config",
)


def assess(meta: MetaReader, now: float, is_alive: Callable[[int], bool] | None = None) -> Verdict:
    """The verdict from the journal's meta values (`heartbeat`, `pid`, `paused`, the checks)."""
    beat, pid = meta("heartbeat"), meta("pid")
    # A clean stop records heartbeat = None; a kill -9 leaves the last one and a dead pid.
    if beat is None or pid is None or not (is_alive or is_medbatch_process)(int(pid)):
        return Verdict(running=False, healthy=False)
    age = max(0.0, now - float(beat))
    problem = _problem(meta, age)
    return Verdict(
        running=True,
        healthy=problem is None,
        pid=int(pid),
        heartbeat_age_s=round(age, 1),
        problem=problem,
    )


def _problem(meta: MetaReader, age_s: float) -> str | None:
    """The first thing wrong, most fundamental first; None when nothing is."""
    interval = float(meta("heartbeat_s") or DEFAULT_HEARTBEAT_S)
    if age_s > STALE_HEARTBEATS * interval + STALE_SLACK_S:
        return f"no heartbeat for {age_s:.0f} s (main loop stuck?)"
    paused = meta("paused")
    if paused:
        return f"intake paused ({paused}): no files are taken"
    # Older services record only `healthy`; the separate checks name the part that is down.
    if meta("workers_ok") is False:
        return "the worker pool is broken (no worker can run a batch)"
    if meta("watches_ok") is False:
        return "the inbox watches are down"
    if not meta("healthy"):
        return "the service reports itself unhealthy (watcher or scheduler down)"
    return None


def is_medbatch_process(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    # After a crash the pid may belong to another program by now.
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
    except FileNotFoundError:
        return False
    except OSError:
        return True
    return b"medbatch" in cmdline or b"daemon" in cmdline

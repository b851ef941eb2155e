"""Where the service's time goes: `py-spy record` (raw collapsed stacks, every subprocess) around a
service run, summarised per process role as the top functions by inclusive and self share."""

from __future__ import annotations

import re
import shutil
import sys
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

RATE_HZ = 100
TOP_N = 15
_LINE = re.compile(r"^(.*) (\d+)$")
_FRAME = re.compile(r"^(.*) \((.*?)(?::\d+)?\)$")


def py_spy() -> str:
    found = shutil.which("py-spy", path=str(Path(sys.executable).parent)) or shutil.which("py-spy")
    if found is None:
        raise RuntimeError("py-spy not found: .venv/bin/pip install py-spy")
    return found


def py_spy_command(output: Path) -> list[str]:
    """A wrapper for the service command: sample it and its workers (CPU time only, no idle)."""
    output.parent.mkdir(parents=True, exist_ok=True)
    return [
        py_spy(), "record", "--format", "raw", "--output", str(output), "--rate", str(RATE_HZ),
        "--subprocesses", "--threads", "--nonblocking", "--",
    ]  # fmt: skip


@dataclass
class RoleProfile:
    samples: int = 0
    inclusive: Counter[str] = field(default_factory=Counter)
    own: Counter[str] = field(default_factory=Counter)
    threads: Counter[str] = field(default_factory=Counter)


def _role(processes: list[str]) -> str:
    last = processes[-1]
    if "resource_tracker" in last:
        return "resource tracker"
    if len(processes) == 1:
        return "main process"
    if "daemon.intake.claimer" in last:
        return "mover" if last.rstrip('"').endswith("disposal.mover") else "claimer"
    if "forkserver" in last and len(processes) == 2:
        return "fork server"
    return "workers"


def _function(frame: str) -> str:
    match = _FRAME.match(frame)
    if match is None:
        return frame
    name, location = match.groups()
    for marker in ("site-packages/", "python3.11/"):
        location = location.split(marker, 1)[-1]
    return f"{name} ({location})"


def _thread_name(frame: str, process: str) -> str:
    """`thread (tid): name`; before a name is known, the thread whose tid is the pid is main."""
    if ": " in frame:
        return frame.split(": ", 1)[1]
    tid = frame.removeprefix("thread (").rstrip(")")
    pid = process.removeprefix("process ").split(":", 1)[0]
    return "MainThread" if tid == pid else f"thread {tid}"


def parse_profile(path: Path) -> dict[str, RoleProfile]:
    roles: dict[str, RoleProfile] = {}
    for line in path.read_text(errors="replace").splitlines():
        match = _LINE.match(line)
        if match is None:
            continue
        stack, count = match.group(1).split(";"), int(match.group(2))
        processes = [f for f in stack if f.startswith("process ")]
        threads = [f for f in stack if f.startswith("thread ")]
        frames = [_function(f) for f in stack if not f.startswith(("process ", "thread "))]
        if not processes or not frames:
            continue
        profile = roles.setdefault(_role(processes), RoleProfile())
        profile.samples += count
        thread = _thread_name(threads[-1], processes[-1]) if threads else "?"
        profile.threads[thread] += count
        for function in set(frames):
            profile.inclusive[function] += count
        profile.own[frames[-1]] += count
    return roles


def summarise_profile(path: Path, title: str) -> list[str]:
    """Text lines: per role, busy CPU seconds, threads, and the top functions by share."""
    if not path.exists():
        return [f"profile {title}: py-spy wrote nothing to {path}"]
    lines = [f"profile of {title} (py-spy {RATE_HZ} Hz, busy samples only): {path}"]
    for role, profile in sorted(parse_profile(path).items(), key=lambda kv: -kv[1].samples):
        total = max(profile.samples, 1)
        lines.append(f"  [{role}] {profile.samples / RATE_HZ:.1f} CPU-s sampled")
        threads = ", ".join(f"{t} {n / total:.0%}" for t, n in profile.threads.most_common(4))
        lines.append(f"    threads: {threads}")
        ours = [(f, n) for f, n in profile.inclusive.most_common() if "daemon/" in f]
        lines.append("    medbatch functions, inclusive share:")
        lines += [f"      {n / total:6.1%}  {f}" for f, n in ours[:TOP_N]]
        lines.append("    leaf functions (self time), share:")
        lines += [f"      {n / total:6.1%}  {f}" for f, n in profile.own.most_common(TOP_N)]
    return lines

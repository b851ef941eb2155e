"""The summary: one table on stdout, and the same as JSON with machine information."""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench.section import Figure, SectionResult


def machine() -> dict[str, Any]:
    info: dict[str, Any] = {
        "nproc": os.cpu_count(),
        "affinity": len(os.sched_getaffinity(0)),
        "python": platform.python_version(),
        "implementation": platform.python_implementation(),
        "platform": platform.platform(),
    }
    info.update(_git())
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                info["cpu"] = line.split(":", 1)[1].strip()
                break
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal"):
                info["mem_gib"] = round(int(line.split()[1]) / 2**20, 1)
                break
    except OSError:
        pass
    return info


@dataclass(frozen=True)
class MachineLoad:
    """Busy and total jiffies of all CPUs (/proc/stat) and the 1-minute load at one moment."""

    busy: int
    total: int
    loadavg_1m: float

    @classmethod
    def now(cls) -> MachineLoad:
        fields = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
        idle = fields[3] + fields[4]  # idle + iowait
        return cls(sum(fields) - idle, sum(fields), os.getloadavg()[0])

    def busy_pct_since(self) -> float:
        """Share of all CPUs busy since then (this bench and its service included)."""
        later = MachineLoad.now()
        return 100 * (later.busy - self.busy) / max(later.total - self.total, 1)


def _git() -> dict[str, Any]:
    """The commit measured and how many files differed from it (read-only git commands)."""
    root = Path(__file__).resolve().parents[1]
    try:
        head = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=root, capture_output=True, text=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain"], cwd=root, capture_output=True, text=True
        ).stdout.splitlines()
    except OSError:
        return {}
    return {"git_head": head, "git_changed_files": len(dirty)}


def _format(value: Figure) -> str:
    if isinstance(value, float):
        if value != 0 and (abs(value) < 1e-3 or abs(value) >= 1e7):
            return f"{value:.2e}"
        return f"{value:,.3f}".rstrip("0").rstrip(".")
    return str(value)


def _rows(result: SectionResult) -> list[tuple[str, str, str, str]]:
    targets = {t.metric: t for t in result.targets}
    rows = []
    for metric, value in result.figures.items():
        unit = result.units.get(metric, "")
        target = targets.get(metric)
        goal = f"{target.op} {_format(target.threshold)}" if target else ""
        verdict = ("ok" if target.is_met else "MISSED") if target else ""
        rows.append((metric, f"{_format(value)} {unit}".strip(), goal, verdict))
    for name, is_ok in result.checks.items():
        rows.append((f"check: {name}", "yes" if is_ok else "NO", "", "ok" if is_ok else "FAILED"))
    return rows


def render_table(results: Sequence[SectionResult]) -> str:
    header = ("section", "figure", "value", "target", "")
    lines: list[tuple[str, ...]] = [header]
    for result in results:
        if result.error:
            lines.append((result.name, "ERROR", result.error[:70], "", "FAILED"))
        for metric, value, goal, verdict in _rows(result):
            lines.append((result.name, metric, value, goal, verdict))
    widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
    text = [
        "  ".join(cell.ljust(w) for cell, w in zip(line, widths, strict=True)).rstrip()
        for line in lines
    ]
    text.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(text)


def write_json(
    results: Sequence[SectionResult],
    path: Path,
    argv: Sequence[str],
    options: dict[str, Any],
    elapsed_s: float,
) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    document = {
        "when": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "command": [Path(sys.executable).name, "-m", "bench", *argv],
        "elapsed_s": round(elapsed_s, 1),
        "options": options,
        "machine": machine(),
        "ok": all(r.is_ok for r in results),
        "sections": {r.name: r.to_json() for r in results},
    }
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(document, indent=2) + "\n")
    os.replace(tmp, path)

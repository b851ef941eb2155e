"""Idle CPU: the example pipelines over empty inboxes; CPU seconds of the service and every
process it started (from /proc utime + stime) over a window, as a share of one core."""

from __future__ import annotations

import time
import tomllib
from pathlib import Path
from typing import Any

from bench.cpu import CLOCK_TICKS_PER_S, tree_ticks
from bench.options import BenchOptions
from bench.section import SectionResult
from bench.service import REPO, ServiceProcess, ServiceTree, temp_root

EXAMPLE_CONFIG = REPO / "config" / "medbatch.toml"
IDLE_TARGET_PCT = 1.0
SETTLE_AFTER_READY_S = 1.0


def example_sections(path: Path = EXAMPLE_CONFIG) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """The example config's pipelines and tables, minus its paths (the bench supplies its own)."""
    raw = tomllib.loads(path.read_text())
    pipelines = raw.pop("pipeline")
    raw.pop("paths", None)
    return pipelines, raw


def run_idle(opts: BenchOptions) -> SectionResult:
    result = SectionResult("idle")
    pipelines, sections = example_sections()
    sections["workers"] = {**sections.get("workers", {}), "count": opts.workers}
    with temp_root("idle") as root:
        tree = ServiceTree(root, pipelines, **sections)
        with ServiceProcess(tree) as service:
            service.wait_ready()
            # The workers start after READY (the fork server imports every kind's libraries,
            # 1-2 CPU-s): idle begins once they have, not while a slow machine still imports.
            service.wait_ready(event="pool.ready")
            time.sleep(SETTLE_AFTER_READY_S)  # let start-up work (warm-up replies) finish
            before, started = tree_ticks(service.pid), time.perf_counter()
            time.sleep(opts.idle_s)
            after, window_s = tree_ticks(service.pid), time.perf_counter() - started
            code = service.terminate()
    main_s = (after[service.pid] - before[service.pid]) / CLOCK_TICKS_PER_S
    children = [pid for pid in after if pid not in (service.pid, -1)]
    children_ticks = sum(after[pid] - before.get(pid, 0) for pid in children)
    children_ticks += after[-1] - before[-1]  # children reaped during the window
    children_s = children_ticks / CLOCK_TICKS_PER_S
    result.add("window_s", round(window_s, 1), "s")
    result.add("processes", 1 + len(children))
    result.add("main_cpu_pct", round(100 * main_s / window_s, 3), "%")
    result.add("children_cpu_pct", round(100 * children_s / window_s, 3), "%")
    result.add("cpu_pct", round(100 * (main_s + children_s) / window_s, 3), "%")
    result.target("cpu_pct", "<", IDLE_TARGET_PCT)
    result.check("SIGTERM exit 0", code == 0)
    return result

"""Start-up checks of the folders (before the journal is opened), and what the service reads
off the settings about its pipelines. Main process."""

from __future__ import annotations

import gc
import os
from pathlib import Path

from daemon.config import Pipeline, Settings
from daemon.errors import ConfigError

# The main loop makes several short-lived objects per file and almost no reference cycles. At the
# collector's defaults (a pass every 700 allocations, full passes over everything imported) the
# collector took 5-7 % of the main loop's CPU while claiming a backlog of small files.
GC_THRESHOLD = (10_000, 10, 10)


def tune_garbage_collector() -> None:
    """What is imported by now lives as long as the process: out of the collector's passes
    (gc.freeze); and the youngest generation is collected less often."""
    gc.freeze()
    gc.set_threshold(*GC_THRESHOLD)


def prepare_folders(settings: Settings) -> None:
    """Create the service's folders (private) and each pipeline's inbox; the spool must be on
    the inbox's filesystem (claiming a file is a rename)."""
    paths = settings.paths
    for folder in (paths.state, paths.spool, paths.outbox, paths.quarantine, paths.archive):
        folder.mkdir(parents=True, exist_ok=True, mode=0o750)
    for p in settings.pipeline:
        (paths.inbox / p.name).mkdir(parents=True, exist_ok=True)
    if os.stat(paths.inbox).st_dev != os.stat(paths.spool).st_dev:
        raise ConfigError(
            "paths.state",
            "must be on the same filesystem as paths.inbox "
            "(claiming a file is a rename into state/spool)",
        )


def by_name(settings: Settings) -> dict[str, Pipeline]:
    return {p.name: p for p in settings.pipeline}


def hashed_pipelines(settings: Settings) -> frozenset[str]:
    """Pipelines whose file names reach the audit log only as a keyed hash."""
    return frozenset(p.name for p in settings.pipeline if p.hash_names)


def kinds(settings: Settings) -> list[str]:
    return [p.kind for p in settings.pipeline]


def inbox_folders(settings: Settings) -> dict[str, Path]:
    return {p.name: settings.paths.inbox / p.name for p in settings.pipeline}

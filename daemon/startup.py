"""Start-up checks of the folders (before the journal is opened), and what the service reads
off the settings about its pipelines. Main process."""

from __future__ import annotations

import os
from pathlib import Path

from daemon.config import Pipeline, Settings
from daemon.errors import ConfigError


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

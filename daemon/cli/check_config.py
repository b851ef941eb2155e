"""`medbatch check-config [PATH]`: validate a config and the folders it names, print the result."""

from __future__ import annotations

import json
import sys
from pathlib import Path

from daemon import preflight
from daemon.cli.exits import EX_OK
from daemon.config import load_settings


def check_config(path: Path) -> int:
    settings = load_settings(path)
    # Not the port: the running service may hold it, and that is no fault of the config.
    preflight.check(settings, bind=False)
    print(json.dumps(settings.model_dump(mode="json"), indent=2))
    if settings.workers.executor == "dask":
        print(
            f"note: executor = 'dask': every Dask worker must read {settings.paths.spool} and "
            f"write {settings.paths.outbox} at these same paths (shared storage); the service "
            "checks it at start with a probe task",
            file=sys.stderr,
        )
    return EX_OK

"""`medbatch run [--once]`: check everything, take the instance lock, run the service."""

from __future__ import annotations

from daemon import preflight, startup
from daemon.config import Settings
from daemon.instance_lock import InstanceLock


def run(settings: Settings, *, once: bool) -> int:
    # Before anything is touched: a bad folder or a taken port fails here (78), not after
    # recovery and a `daemon.started` line; a second instance fails here (75).
    preflight.check(settings, bind=True)
    from daemon.service import Service

    startup.tune_garbage_collector()
    with InstanceLock(settings.paths.state):
        return Service(settings, once=once).run()

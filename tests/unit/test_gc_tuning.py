"""The main loop's collector settings: imports frozen out of its passes, the young generation
collected less often (a backlog of small files made it 5-7 % of the loop's CPU)."""

from __future__ import annotations

import gc
import subprocess
import sys
import textwrap
from pathlib import Path

from daemon import startup


def test_run_tunes_the_collector_before_the_service_starts(tmp_path: Path) -> None:
    """`medbatch run` calls the tuning after its imports: checked in a fresh interpreter with
    the service replaced by a probe, so the test's own collector is left alone."""
    probe = textwrap.dedent(
        """
        import gc, sys, types
        from daemon.cli import run as cli_run
        from daemon.config import Settings

        class Probe:
            def __init__(self, settings, once):
                pass
            def run(self):
                print(gc.get_threshold(), gc.get_freeze_count() > 10_000)
                return 0

        sys.modules["daemon.service"] = types.SimpleNamespace(Service=Probe)
        cli_run.preflight.check = lambda settings, bind: None
        root = sys.argv[1]
        paths = {k: f"{root}/{k}" for k in ("inbox", "outbox", "state", "quarantine")}
        pipeline = [{"name": "emr", "kind": "emr"}]
        settings = Settings.model_validate({"paths": paths, "pipeline": pipeline})
        sys.exit(cli_run.run(settings, once=True))
        """
    )
    done = subprocess.run(
        [sys.executable, "-c", probe, str(tmp_path)], capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == [*str(startup.GC_THRESHOLD).split(), "True"]


def test_tuning_freezes_what_exists_and_raises_the_threshold() -> None:
    before = gc.get_threshold()
    try:
        startup.tune_garbage_collector()
        assert gc.get_threshold() == startup.GC_THRESHOLD
        assert gc.get_freeze_count() > 0
    finally:
        gc.unfreeze()
        gc.set_threshold(*before)

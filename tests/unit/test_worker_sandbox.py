"""A worker starts inside the shipped unit's system call sandbox, whatever `[workers] nice` says.

The unit's filter once took setpriority away while every worker called os.nice at start: under
systemd no worker could start, and no batch was ever published (the acceptance tier runs the
whole service so; these tests run one worker's start-up, with and without the nice steps)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from tests.support.seccomp import UnitSandbox
from tests.unit.test_systemd_unit import UNIT, directives

PROBE = """
import os
from daemon.worker import init_worker
init_worker([], None, {nice})
print(os.getpriority(os.PRIO_PROCESS, 0))
"""


def unit_filter(*, without: str = "") -> UnitSandbox:
    service = {k.removeprefix("Service."): v for k, v in directives(UNIT.read_text()).items()}
    return UnitSandbox.of_unit(service, without=without)


def start_worker(sandbox: UnitSandbox, nice: int) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", PROBE.format(nice=nice)],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
        preexec_fn=sandbox.load,
    )


@pytest.mark.parametrize("nice", [0, 7])
def test_a_worker_starts_in_the_units_sandbox_at_its_nice(nice: int) -> None:
    started = start_worker(unit_filter(), nice)
    assert started.returncode == 0, started.stderr
    assert int(started.stdout.split()[-1]) == os.getpriority(os.PRIO_PROCESS, 0) + nice


def test_a_sandbox_that_forbids_setpriority_costs_the_nice_not_the_worker() -> None:
    # Given a stricter unit (a drop-in without the setpriority line)
    sandbox = unit_filter(without="setpriority")
    probe = subprocess.run(
        [sys.executable, "-c", "import os; os.nice(0)"],
        capture_output=True, text=True, timeout=60, check=False, preexec_fn=sandbox.load,
    )  # fmt: skip
    assert probe.returncode != 0 and "PermissionError" in probe.stderr  # the filter bites
    # When a worker starts there, asked to run 7 steps below the service
    started = start_worker(sandbox, 7)
    # Then it starts all the same, at the service's priority, and says why
    assert started.returncode == 0, started.stderr
    assert int(started.stdout.split()[-1]) == os.getpriority(os.PRIO_PROCESS, 0)
    assert "worker.nice_refused" in started.stderr

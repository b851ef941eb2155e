"""The running service's claimer process killed for real, holding a chunk of a backlog: the
service starts another, and every file is published once."""

from __future__ import annotations

import os
import random
import signal

from tests.support.accounting import check_accounting
from tests.support.data import emr_csv
from tests.support.service import Service
from tests.support.waiting import wait_until
from tests.system.conftest import MakeService
from tests.system.test_faults import assert_alive, emr

READY = "intake.claimer_ready"


def new_claimer(service: Service, killed: list[int]) -> int:
    """The pid of a claimer ready to claim, not one of `killed`."""

    def found() -> int | None:
        ready = [
            line["pid"] for line in service.logs() if line.get("event") == "intake.claimer_ready"
        ]
        pid = service.claimer_pid()
        return pid if pid in ready and pid not in killed else None

    return wait_until(found, 30, 0.002, message="a claimer")


def deaths(service: Service) -> list[dict[str, object]]:
    return [line for line in service.logs() if line.get("event") == "intake.claimer_died"]


def test_a_killed_claimer_loses_no_file_and_is_replaced(make_service: MakeService) -> None:
    rng = random.Random(1301)
    service = make_service([emr(max_files=500)])
    service.start()
    # Given a claimer (the second chunk starts it) that holds the chunks of 1,000 new files
    # (stopped: it cannot finish them)
    dropped: dict[str, str] = {}
    for name in ("first.csv", "second.csv"):
        dropped[name] = service.drop("emr", name, emr_csv(rng, rows=3))
        wait_until(lambda: service.accounted() == len(dropped), 30, message=f"{name} published")
    first = new_claimer(service, [])
    os.kill(first, signal.SIGSTOP)
    dropped |= {
        f"v{i:04d}.csv": service.drop("emr", f"v{i:04d}.csv", emr_csv(rng, rows=3))
        for i in range(1000)
    }
    wait_until(lambda: service.journal("SELECT 1 FROM files WHERE state = 'claiming'"), 30,
               message="chunks sent to the stopped claimer")  # fmt: skip
    # When it is killed
    os.kill(first, signal.SIGKILL)
    # Then a new claimer takes over, and every file is published once
    second = new_claimer(service, [first])
    wait_until(lambda: service.accounted() == len(dropped), 120, message="the files accounted")
    # And when the new one is killed while idle, more files are published all the same
    os.kill(second, signal.SIGKILL)
    wait_until(lambda: len(deaths(service)) == 2, 30, message="the second death noticed")
    dropped |= {f"w{i}.csv": service.drop("emr", f"w{i}.csv", emr_csv(rng)) for i in range(50)}
    wait_until(lambda: service.accounted() == len(dropped), 60, message="the new files accounted")
    new_claimer(service, [first, second])
    assert_alive(service, "after its claimer was killed twice")
    assert service.stop() == 0
    check_accounting(service, dropped)
    assert service.quarantined() == []
    assert service.journal("SELECT count(*) FROM files WHERE state = 'claiming'") == [(0,)]
    told = [(d["exitcode"], d["chunks_lost"]) for d in deaths(service)]
    assert told[0][0] == told[1][0] == -signal.SIGKILL, told
    assert int(str(told[0][1])) >= 1 and told[1][1] == 0, told

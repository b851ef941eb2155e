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
MOVER_READY = "disposal.mover_ready"


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


def test_an_idle_service_starts_its_claimer_before_the_first_drop(
    make_service: MakeService,
) -> None:
    """Inboxes empty at start: the claimer's child starts with the service, so its start and
    imports are not paid by the first files dropped (a backlog's second chunk starts it)."""
    rng = random.Random(1303)
    service = make_service([emr(max_files=1)])
    service.start()
    # Given a service that found nothing to claim at start: its claimer is up already
    ready = new_claimer(service, [])
    assert service.accounted() == 0
    # When files are dropped, they are published, and the same child serves them
    dropped = {f"d{i}.csv": service.drop("emr", f"d{i}.csv", emr_csv(rng)) for i in range(3)}
    wait_until(lambda: service.accounted() == len(dropped), 30, message="the files accounted")
    assert service.claimer_pid() == ready
    assert service.stop() == 0
    check_accounting(service, dropped)


def test_a_killed_claimer_loses_no_file_and_is_replaced(make_service: MakeService) -> None:
    rng = random.Random(1301)
    service = make_service([emr(max_files=500)])
    service.start()
    # Given a claimer (started with the idle service) that holds the chunks of 1,000 new files
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


def test_a_killed_mover_loses_no_input_and_the_archive_is_finished(
    make_service: MakeService,
) -> None:
    """The process of the archive renames (the claimer's code, role `disposal.mover`) stopped
    with lots in hand, then killed: every file is still published once, the lots come back
    empty (`disposal.mover_died`), and the inputs they held are archived later all the same;
    the spool ends empty."""
    rng = random.Random(1302)
    service = make_service([emr(max_files=50)])
    service.start()
    # Given the mover, started with the service (its imports done before the first publish)
    dropped: dict[str, str] = {}

    def mover() -> int | None:
        pid = service.claimer_pid("disposal.mover")
        ready = [line["pid"] for line in service.logs() if line.get("event") == MOVER_READY]
        return pid if pid in ready else None

    first = wait_until(mover, 30, 0.05, message="the mover ready, no file dropped yet")
    # When it is stopped while batches publish, and killed with their lots in hand
    os.kill(first, signal.SIGSTOP)
    dropped |= {
        f"v{i:03d}.csv": service.drop("emr", f"v{i:03d}.csv", emr_csv(rng)) for i in range(300)
    }
    published = "SELECT count(*) FROM files WHERE state = 'published'"
    wait_until(lambda: service.journal(published) == [(len(dropped),)], 60, message="published")
    assert service.accounted() < len(dropped), "no lot was held by the stopped mover"
    os.kill(first, signal.SIGKILL)
    # Then nothing is lost, and every input leaves the spool
    wait_until(lambda: any(line.get("event") == "disposal.mover_died" for line in service.logs()),
               30, message="the mover's death noticed")  # fmt: skip
    spool = service.spool / "emr"
    wait_until(lambda: not any(spool.iterdir()), 60, message="the spool emptied")
    assert_alive(service, "after its mover was killed")
    assert service.stop() == 0
    check_accounting(service, dropped)
    assert service.journal("SELECT count(*) FROM files WHERE disposed = 0") == [(0,)]
    (died,) = [line for line in service.logs() if line.get("event") == "disposal.mover_died"]
    assert died["exitcode"] == -signal.SIGKILL and int(str(died["archive_lots_lost"])) >= 1

"""Issue 12.8: an inbox flooded with entries intake cannot take never slows a good file down.

Refused entries are remembered until they change, so rescans cost a listing, not a claim each;
files an event announced are taken before a rescan's backlog.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

from tests.security.corpus import emr_pipeline, good_emr, published_names
from tests.support.service import cpu_s
from tests.support.waiting import wait_until
from tests.system.conftest import MakeService

LINKS, EMPTIES = 20_000, 10_000
RESCAN_S = 1.0


def flood(inbox: Path) -> None:
    inbox.mkdir(parents=True, exist_ok=True)
    for i in range(LINKS):
        os.symlink("/etc/passwd", inbox / f"link{i:05d}.csv")
    for i in range(EMPTIES):
        (inbox / f"empty{i:05d}.csv").touch()


def test_a_flooded_inbox_takes_a_new_file_within_seconds_at_low_cpu(
    make_service: MakeService,
) -> None:
    """20,000 symlinks and 10,000 empty files in an inbox: once seen, each is reported once and
    not examined again; a good file dropped afterwards is published within seconds, and the
    main process stays nearly idle over the next rescans."""
    # Given: a running service whose inbox holds the flood
    service = make_service(
        [emr_pipeline(max_files=1000, max_wait=0.5)],
        service={"tick_s": 0.1, "rescan_s": RESCAN_S},
    )
    flood(service.inbox / "emr")
    service.start()
    assert service.process is not None
    wait_until(
        lambda: service.journal("SELECT count(*) FROM rejected")[0][0] == LINKS,
        120,
        message="every link rejected",
    )
    wait_until(lambda: service.accounted() == EMPTIES, 180, message="every empty file accounted")

    # When: a good file arrives
    dropped_at = time.monotonic()
    service.drop("emr", "good.csv", good_emr(1))
    wait_until(lambda: "good.csv" in published_names(service), 5, message="good file published")
    latency_s = time.monotonic() - dropped_at

    # Then: the next rescans cost the main process little CPU, and nothing is reported again
    before, started = cpu_s(service.process.pid), time.monotonic()
    wait_until(lambda: time.monotonic() - started >= 4 * RESCAN_S, 10, message="four rescans")
    busy = (cpu_s(service.process.pid) - before) / (time.monotonic() - started)
    print(f"flood: good file published in {latency_s:.2f} s; main process {busy:.1%} of a core")
    assert busy < 0.15, f"main process at {busy:.0%} of a core over four rescans"
    assert service.journal("SELECT count(*) FROM rejected")[0][0] == LINKS
    assert len([e for e in service.logs() if e.get("event") == "file.rejected"]) == LINKS
    assert latency_s < 5
    assert service.stop() == 0

"""SIGHUP reloads the config: valid changes apply without losing or re-running a file; an
invalid config is refused and the service goes on with the old one."""

from __future__ import annotations

import random
import signal
from collections import Counter
from collections.abc import Callable
from typing import Any

import pytest

from daemon.audit import hash_name
from tests.support.accounting import check_accounting
from tests.support.data import emr_csv
from tests.support.service import Service, render_config
from tests.support.waiting import wait_until
from tests.system.conftest import MakeService

SECTIONS = {"workers": {"count": 2}, "service": {"tick_s": 0.1, "rescan_s": 5}}


def emr(**overrides: object) -> dict[str, object]:
    return {
        "name": "emr",
        "kind": "emr",
        "priority": 3,
        "max_files": 10,
        "max_wait": 600,
        "settle_s": 0.1,
        **overrides,
    }


def events(service: Service, event: str) -> list[dict[str, Any]]:
    return [a for a in service.audit() if a["event"] == event]


def reload(service: Service, text: str, outcome: str) -> dict[str, Any]:
    """Write the config, SIGHUP, wait for the one new `config.reloaded`/`config.rejected` line."""
    before = len(events(service, outcome))
    service.config.write_text(text)
    service.signal(signal.SIGHUP)
    wait_until(lambda: len(events(service, outcome)) > before, 20, message=outcome)
    return events(service, outcome)[-1]


def received(service: Service, pipeline: str) -> int:
    return service.journal("SELECT count(*) FROM files WHERE pipeline=?", pipeline)[0][0]


def test_valid_change_applies_without_losing_or_rerunning_files(
    make_service: MakeService,
) -> None:
    """Lower max_files, raise the priority, add a pipeline: the open batch, later batches and
    the new pipeline follow the new config; every file is published once, every batch once."""
    # Given a running service with 4 files in an open batch (max_files 10, long max_wait)
    service = make_service([emr()])
    service.start()
    rng = random.Random(31)
    dropped = {}
    for i in range(4):
        dropped[f"a{i}.csv"] = service.drop("emr", f"a{i}.csv", emr_csv(rng))
    wait_until(lambda: received(service, "emr") == 4)

    # When the config lowers max_files below the open batch, raises the priority, adds "labs"
    line = reload(
        service,
        render_config([emr(max_files=3, priority=1), emr(name="labs", max_files=2)], SECTIONS),
        "config.reloaded",
    )
    assert line["pipelines"] == 2

    # Then the open batch, already at the new limit, is sealed without waiting for max_wait
    wait_until(lambda: events(service, "batch.sealed"), 10, message="the open batch sealed")
    # And new files are batched by the new limit and priority, and the new pipeline works
    for i in range(6):
        dropped[f"b{i}.csv"] = service.drop("emr", f"b{i}.csv", emr_csv(rng))
    for i in range(2):
        dropped[f"l{i}.csv"] = service.drop("labs", f"l{i}.csv", emr_csv(rng))
    wait_until(lambda: service.accounted() == len(dropped), 60, message="all accounted")
    assert service.stop() == 0

    sealed = events(service, "batch.sealed")
    assert sorted((a["pipeline"], a["files"]) for a in sealed) == [
        ("emr", 3),
        ("emr", 3),
        ("emr", 4),
        ("labs", 2),
    ]
    assert {a["priority"] for a in sealed if a["pipeline"] == "emr"} == {1}
    started = Counter(a["batch_id"] for a in events(service, "batch.started"))
    assert set(started.values()) == {1}, started
    assert not events(service, "batch.retried")
    check_accounting(service, dropped)


def _typo(service: Service) -> str:
    return render_config([emr(max_files=5, max_filez=1)], SECTIONS)


def _bad_toml(service: Service) -> str:
    return service.config.read_text() + "\n[[pipeline]\nname = \n"


def _moved_outbox(service: Service) -> str:
    return service.config.read_text().replace('outbox = "outbox"', 'outbox = "elsewhere"')


def _bad_value(service: Service) -> str:
    return render_config([emr(max_files=0)], SECTIONS)


@pytest.mark.parametrize(
    ("make_text", "named"),
    [
        (_typo, "pipeline[0].max_filez"),
        (_bad_toml, "not valid TOML"),
        (_moved_outbox, "paths"),
        (_bad_value, "pipeline[0].max_files"),
    ],
    ids=["unknown_key", "bad_toml", "paths_changed", "bad_value"],
)
def test_invalid_config_is_refused_and_the_old_one_kept(
    make_service: MakeService, make_text: Callable[[Service], str], named: str
) -> None:
    """An invalid config on SIGHUP: a `config.rejected` line naming why; the service keeps
    running and batching by the old config (max_files 2)."""
    service = make_service([emr(max_files=2)])
    service.start()
    rng = random.Random(32)
    dropped = {}

    line = reload(service, make_text(service), "config.rejected")
    assert named in line["reason"]
    assert "config.rejected" in [log["event"] for log in service.logs()]

    for i in range(4):
        dropped[f"c{i}.csv"] = service.drop("emr", f"c{i}.csv", emr_csv(rng))
    wait_until(lambda: service.accounted() == len(dropped), 60, message="all accounted")
    assert service.process is not None and service.process.poll() is None
    assert service.stop() == 0
    assert [len(m["inputs"]) for m in service.manifests("emr")] == [2, 2]
    assert not events(service, "config.reloaded")
    check_accounting(service, dropped)


def test_removed_pipeline_finishes_its_open_batch(make_service: MakeService) -> None:
    """A reload that removes a pipeline holding an open batch: the service keeps running and
    that batch is still published (under the pipeline's last settings), nothing is stranded."""
    # Given "labs" with two files in an open batch (sealed by max_wait after 3 s)
    service = make_service([emr(), emr(name="labs", max_wait=3)])
    service.start()
    rng = random.Random(33)
    dropped = {f"l{i}.csv": service.drop("labs", f"l{i}.csv", emr_csv(rng)) for i in range(2)}
    wait_until(lambda: received(service, "labs") == 2)

    # When a reload removes "labs"
    reload(service, render_config([emr()], SECTIONS), "config.reloaded")

    # Then its batch is sealed and published all the same, and the service is still up
    process = service.process
    assert process is not None
    wait_until(
        lambda: service.accounted() == 2 or process.poll() is not None,
        30,
        message="the removed pipeline's files accounted",
    )
    assert process.poll() is None, service.stderr()[-2000:]
    assert service.stop() == 0
    check_accounting(service, dropped)


def test_hash_names_switched_on_by_a_reload(make_service: MakeService) -> None:
    """Turning on hash_names (off in the first config) by SIGHUP creates the name key then
    (0600) and hashes the names of the files that come after; earlier lines stay as written."""
    service = make_service([emr(max_files=1, hash_names=False)])
    service.start()
    rng = random.Random(34)
    dropped = {"before.csv": service.drop("emr", "before.csv", emr_csv(rng))}
    wait_until(lambda: service.accounted() == 1)
    key_path = service.root / "state" / "audit-name.key"
    assert not key_path.exists()

    reload(service, render_config([emr(max_files=1, hash_names=True)], SECTIONS), "config.reloaded")
    dropped["after-DOE.csv"] = service.drop("emr", "after-DOE.csv", emr_csv(rng))
    wait_until(lambda: service.accounted() == 2)
    assert service.stop() == 0

    assert key_path.stat().st_mode & 0o777 == 0o600
    key = key_path.read_bytes()
    names = [a["published_name"] for a in events(service, "file.received")]
    assert names == ["before.csv", hash_name(key, "after-DOE.csv")]
    check_accounting(service, dropped)

"""Processors as plugins, through the real service: a kind installed by a third-party package
(entry point `medbatch.processors`) runs like a built-in; an unknown kind is refused."""

from __future__ import annotations

import json

from daemon.processors import known_kinds
from tests.support.accounting import check_accounting
from tests.support.waiting import wait_until
from tests.system.conftest import MakeService

EX_CONFIG = 78


def linecount(**overrides: object) -> dict[str, object]:
    return {
        "name": "notes",
        "kind": "linecount",
        "max_files": 1000,
        "max_wait": 5,
        "settle_s": 0.1,
        **overrides,
    }


def test_installed_plugin_kind_is_accepted_and_publishes(make_service: MakeService) -> None:
    """`kind = "linecount"` (the installed example plugin) passes check-config with its options
    and publishes; a file it refuses is quarantined with its reason."""
    files = {
        "a.txt": b"one\ntwo\n\nthree\n",
        "b.txt": b"four\nfive\n",
        "binary.txt": b"six\x00seven\n",
    }
    service = make_service([linecount(max_files=len(files), skip_blank=True)])

    checked = service.run("check-config", timeout_s=60)
    assert checked.returncode == 0, checked.stderr
    (pipeline,) = json.loads(checked.stdout)["pipeline"]
    assert (pipeline["kind"], pipeline["options"]) == ("linecount", {"skip_blank": True})

    service.start()
    dropped = {name: service.drop("notes", name, data) for name, data in files.items()}
    wait_until(lambda: service.accounted() == len(files), 30, message="all accounted")
    assert service.stop() == 0

    (manifest,) = service.manifests("notes")
    assert manifest["kind"] == "linecount"
    assert {i["name"]: i["lines"] for i in manifest["inputs"]} == {"a.txt": 3, "b.txt": 2}
    result = service.outbox / "notes" / manifest["batch_id"] / "result.csv"
    assert result.read_text().splitlines() == ["lines", "5"]
    (refused,) = service.quarantined("notes")
    assert (refused["name"], refused["reason"]) == ("binary.txt", "binary")
    check_accounting(service, dropped)


def test_unknown_kind_is_refused_listing_the_known_kinds(make_service: MakeService) -> None:
    """An unknown kind fails check-config (and run) with exit 78, naming the key and listing
    every known kind, the plugin's among them."""
    service = make_service([linecount(kind="dicomviewer")])
    for command in (["check-config"], ["run"]):
        done = service.run(*command, timeout_s=60)
        assert done.returncode == EX_CONFIG, (command, done.stderr)
        assert "pipeline[0].kind" in done.stderr
        assert "dicomviewer" in done.stderr
        for kind in known_kinds():
            assert kind in done.stderr, (kind, done.stderr)
    assert "linecount" in known_kinds()
    assert not service.outbox.exists()  # refused before it set anything up


def test_plugin_options_are_checked_like_built_in_ones(make_service: MakeService) -> None:
    """A typo in a plugin's option is refused with exit 78 and the key's name."""
    service = make_service([linecount(skip_blnk=False)])
    done = service.run("check-config", timeout_s=60)
    assert done.returncode == EX_CONFIG
    assert "skip_blnk" in done.stderr

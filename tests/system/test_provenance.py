"""Provenance: each manifest says which code, processor options (after defaults), config file
and worker host produced it; its `batch.published` line says the same in versions and hashes."""

from __future__ import annotations

import hashlib
import json
import random
import signal
import socket
from typing import Any

import pytest

import daemon
from daemon.processors.options import EmrOptions, GenomicsOptions
from tests.support.accounting import check_accounting
from tests.support.data import emr_csv
from tests.support.service import Service, render_config
from tests.support.waiting import wait_until
from tests.system.conftest import MakeService

SECTIONS = {"workers": {"count": 2}, "service": {"tick_s": 0.1, "rescan_s": 5}}
PROVENANCE_KEYS = {"version", "kind", "options", "options_sha256", "config_sha256", "host"}
PUBLISHED_KEYS = {
    "ts", "seq", "event", "prev", "hash", "chain", "pipeline", "batch_id", "files", "quarantined",
    "folder", "version", "host", "config_sha256", "options_sha256",
}  # fmt: skip


def pipeline(kind: str, **overrides: object) -> dict[str, object]:
    return {"name": kind, "kind": kind, "max_files": 2, "max_wait": 600, "settle_s": 0.1,
            **overrides}  # fmt: skip


def genomics_csv(rng: random.Random) -> bytes:
    rows = [f"G{rng.randint(1, 9)},s{rng.randint(1, 4)},{rng.uniform(1, 9):.4f}" for _ in range(30)]
    return ("gene,sample,expression\n" + "\n".join(rows) + "\n").encode()


CASES: dict[str, tuple[Any, Any, dict[str, object]]] = {
    "emr": (emr_csv, EmrOptions, {"group_by": "diagnosis", "statistics": ["mean", "max"]}),
    "genomics": (genomics_csv, GenomicsOptions, {"layout": "long", "duplicate_pairs": "mean"}),
}


def canonical_sha256(options: dict[str, Any]) -> str:
    text = json.dumps(options, sort_keys=True, separators=(",", ":"), ensure_ascii=True)
    return hashlib.sha256(text.encode()).hexdigest()


def published_lines(service: Service) -> dict[str, dict[str, Any]]:
    return {a["batch_id"]: a for a in service.audit() if a["event"] == "batch.published"}


def check_provenance(
    service: Service, manifest: dict[str, Any], options: dict[str, Any], config: bytes
) -> None:
    """The manifest's provenance and its audit line, each field against values computed here."""
    provenance = manifest["provenance"]
    assert set(provenance) == PROVENANCE_KEYS
    assert provenance["version"] == daemon.__version__
    assert provenance["kind"] == manifest["kind"]
    assert provenance["options"] == options
    assert provenance["options_sha256"] == canonical_sha256(options)
    assert provenance["config_sha256"] == hashlib.sha256(config).hexdigest()
    assert provenance["host"] == socket.gethostname()
    line = published_lines(service)[manifest["batch_id"]]
    # Hashes and versions only: never an option value in the audit line.
    assert set(line) - {"published_name"} == PUBLISHED_KEYS, sorted(line)
    for key in ("version", "host", "config_sha256", "options_sha256"):
        assert line[key] == provenance[key], key


@pytest.mark.parametrize("kind", sorted(CASES))
def test_manifest_and_audit_line_carry_provenance(make_service: MakeService, kind: str) -> None:
    """A published batch's manifest names the version, kind, options with their defaults, the
    config file's sha256 and the host; its batch.published line carries the same hashes."""
    make_content, options_model, overrides = CASES[kind]
    service = make_service([pipeline(kind, **overrides)])
    config = service.config.read_bytes()
    service.start()
    rng = random.Random(140)
    dropped = {f"p{i}.csv": service.drop(kind, f"p{i}.csv", make_content(rng)) for i in range(2)}

    manifest = wait_until(lambda: service.manifests(kind), 60, message="a published batch")[0]
    assert service.stop() == 0

    options = options_model(**overrides).model_dump(mode="json")
    check_provenance(service, manifest, options, config)
    check_accounting(service, dropped)


def test_reload_changes_the_next_batch_provenance(make_service: MakeService) -> None:
    """A reload that changes an option: the batch after it shows the new options and the new
    config hash; the batch before keeps the old ones."""
    # Given a batch published under the first config
    service = make_service([pipeline("emr")])
    first = service.config.read_bytes()
    service.start()
    rng = random.Random(141)
    dropped = {f"a{i}.csv": service.drop("emr", f"a{i}.csv", emr_csv(rng)) for i in range(2)}
    wait_until(lambda: len(service.manifests("emr")) == 1, 60, message="the first batch")

    # When a reload asks for std and a smaller min_cell_size
    before = sum(1 for a in service.audit() if a["event"] == "config.reloaded")
    text = render_config([pipeline("emr", statistics=["mean", "std"], min_cell_size=5)], SECTIONS)
    service.config.write_text(text)
    second = service.config.read_bytes()
    service.signal(signal.SIGHUP)
    wait_until(
        lambda: sum(1 for a in service.audit() if a["event"] == "config.reloaded") > before,
        20,
        message="config.reloaded",
    )
    dropped |= {f"b{i}.csv": service.drop("emr", f"b{i}.csv", emr_csv(rng)) for i in range(2)}
    wait_until(lambda: len(service.manifests("emr")) == 2, 60, message="the second batch")
    assert service.stop() == 0

    # Then each manifest names the config and options it ran under
    old, new = service.manifests("emr")
    check_provenance(service, old, EmrOptions().model_dump(mode="json"), first)
    new_options = EmrOptions(statistics=("mean", "std"), min_cell_size=5).model_dump(mode="json")
    check_provenance(service, new, new_options, second)
    assert old["provenance"]["config_sha256"] != new["provenance"]["config_sha256"]
    assert old["provenance"]["options_sha256"] != new["provenance"]["options_sha256"]
    check_accounting(service, dropped)

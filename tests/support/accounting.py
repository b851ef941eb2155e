"""The accounting checker: every dropped file accounted for exactly once.

Given what a test dropped (name → sha256), it reads the outbox, the quarantine, the journal and
the audit log, and asserts the service's promise (DESIGN.md): each input in exactly one
published manifest or in quarantine, never both, never twice; every published folder whole and
matching its manifest; no `.tmp-*` left; every journal row terminal; the audit chain intact.
"""

from __future__ import annotations

import hashlib
from collections import Counter
from collections.abc import Mapping
from pathlib import Path

from daemon.audit import verify
from tests.support.service import Service


def check_accounting(service: Service, dropped: Mapping[str, str]) -> None:
    """`dropped` maps each file's name to its sha256 (names unique per test)."""
    published = Counter()
    for manifest in service.manifests():
        folder = service.outbox / manifest["pipeline"] / manifest["batch_id"]
        for out in manifest["outputs"]:
            data = (folder / out["name"]).read_bytes()
            assert hashlib.sha256(data).hexdigest() == out["sha256"], f"{folder}/{out['name']}"
        for item in manifest["inputs"]:
            published[(item["name"], item["sha256"])] += 1
    quarantined = Counter((q["name"], q["sha256"]) for q in service.quarantined())
    duplicates = Counter(
        (name, sha)
        for name, sha in service.journal("SELECT name, sha256 FROM files WHERE state='duplicate'")
    )
    problems = []
    for name, sha in dropped.items():
        seen = published[(name, sha)] + quarantined[(name, sha)] + duplicates[(name, sha)]
        if seen != 1:
            problems.append(
                f"{name}: published {published[(name, sha)]}, quarantined "
                f"{quarantined[(name, sha)]}, duplicate {duplicates[(name, sha)]}"
            )
    extra = (set(published) | set(quarantined)) - set(dropped.items())
    assert not problems, f"{len(problems)} inputs not accounted exactly once: {problems[:10]}"
    assert not extra, f"published or quarantined something never dropped: {sorted(extra)[:5]}"
    stray = [p for p in service.outbox.glob("*/.tmp-*")]
    assert not stray, f"staging folders left visible: {stray}"
    open_rows = service.journal(
        "SELECT state, count(*) FROM files WHERE state NOT IN "
        "('published', 'quarantined', 'duplicate') OR disposed=0 GROUP BY state"
    )
    assert not open_rows, f"journal rows not terminal: {open_rows}"
    leftovers = [p for p in Path(service.spool).rglob("*") if p.is_file()]
    assert not leftovers, f"files left in the spool: {leftovers[:5]}"
    report = verify(service.outbox / "_audit")
    assert report.ok, report.error

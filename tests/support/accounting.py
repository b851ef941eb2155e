"""The accounting checker: every dropped file accounted for exactly once.

Given what a test dropped (name → sha256, or (name, sha256) pairs when a name is dropped more than
once), it reads the outbox, the quarantine, the journal and the audit log, and asserts the
service's promise (DESIGN.md): each input in exactly one published manifest or in quarantine,
never both, never twice; every published folder whole, named after its batch and matching its
manifest; no `.tmp-*` left; every journal row (file and batch) terminal and agreeing with the
outbox and quarantine; one audit line for each publication and each input's fate; the audit
chain intact up to the head the journal recorded.
"""

from __future__ import annotations

import codecs
import hashlib
import json
import os
import re
from collections import Counter
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from daemon.audit import read_chain_key, verify
from tests.support.service import Service

TERMINAL_BATCH_STATES = ("published", "quarantined", "failed", "split")


def check_accounting(
    service: Service, dropped: Mapping[str, str] | Iterable[tuple[str, str]]
) -> None:
    """`dropped` maps each file's name to its sha256, or lists (name, sha256) pairs (a pair
    listed twice was dropped twice and must be accounted twice)."""
    expected = Counter(dropped.items() if isinstance(dropped, Mapping) else dropped)
    manifests = service.manifests()
    published: Counter[tuple[str, str]] = Counter()
    for manifest in manifests:
        _check_folder(service, manifest)
        for item in manifest["inputs"]:
            published[(item["name"], item["sha256"])] += 1
    quarantined = Counter((q["name"], q["sha256"]) for q in service.quarantined())
    duplicates = Counter(
        (name, sha)
        for name, sha in service.journal("SELECT name, sha256 FROM files WHERE state='duplicate'")
    )
    problems = []
    for key, times in sorted(expected.items()):
        seen = published[key] + quarantined[key] + duplicates[key]
        if seen != times:
            problems.append(
                f"{key[0]} ({key[1][:12]}): dropped {times}, published {published[key]}, "
                f"quarantined {quarantined[key]}, duplicate {duplicates[key]}"
            )
    extra = (set(published) | set(quarantined)) - set(expected)
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
    _check_journal_agrees(service, manifests)
    _check_audit(service, manifests)
    check_no_raw_names(service)


# Shorter names ("a.csv") could occur by chance in a result; real ones are longer.
_MIN_CHECKED_NAME = 6
# Hashes (content, keyed names) left out of the search: "f5.csv" is in "…de3f5.csv" by chance.
_HEX_RUN = re.compile(rb"[0-9a-f]{32,}")


def check_no_raw_names(service: Service) -> None:
    """No input name of a name-hashing pipeline appears in any published or quarantined file,
    file name, sidecar, audit line or log line (bytes, as written: raw, escaped or JSON)."""
    raw = getattr(service, "raw_names", set())
    rows = service.journal("SELECT pipeline, name FROM files")
    # A name without an extension ("routine") may be a pipeline's or a column's: not checked.
    names = {n for p, n in rows if p not in raw and len(n) >= _MIN_CHECKED_NAME and "." in n}
    if not names:
        return
    needles = {v for n in names for v in _spellings(n)}
    places = [p for p in service.outbox.rglob("*") if p.is_file()]
    places += list((service.root / "quarantine").rglob("*"))
    places += list(service.root.glob("stderr-*.log"))
    for path in places:
        where = _HEX_RUN.sub(b"", os.fsencode(path.name))
        hits = [n for n in needles if n in where]
        assert not hits, f"a raw input name in the path {path}: {hits[:3]}"
        if path.is_file():
            data = _HEX_RUN.sub(b"", path.read_bytes())
            hits = [n for n in needles if n in data]
            assert not hits, f"a raw input name in {path}: {hits[:3]}"


def _spellings(name: str) -> set[bytes]:
    """The name as bytes, as JSON writes it, and (journaled with `\\xNN` escapes for bytes that
    are not UTF-8) as the original bytes."""
    raw = name.encode("utf-8", "surrogateescape")
    found = {raw, json.dumps(name)[1:-1].encode("ascii")}
    if b"\\x" in raw:
        found.add(codecs.escape_decode(raw)[0])
    return found


def _check_folder(service: Service, manifest: dict[str, Any]) -> None:
    """A published folder is named after its batch, holds exactly its manifest and outputs, and
    each output matches the manifest's sha256."""
    folder = service.outbox / manifest["pipeline"] / manifest["batch_id"]
    assert folder.is_dir(), f"manifest of {manifest['batch_id']} is not in {folder}"
    names = {out["name"] for out in manifest["outputs"]}
    present = {p.name for p in folder.iterdir()}
    assert present == names | {"manifest.json"}, (
        f"{folder}: holds {sorted(present)}, manifest lists {sorted(names)}"
    )
    for out in manifest["outputs"]:
        data = (folder / out["name"]).read_bytes()
        assert hashlib.sha256(data).hexdigest() == out["sha256"], f"{folder}/{out['name']}"


def _check_journal_agrees(service: Service, manifests: list[dict[str, Any]]) -> None:
    """Batches terminal; the journal's published batches are exactly the published folders; each
    published input's batch lists it; each quarantined input has its sidecar."""
    states = ",".join(f"'{s}'" for s in TERMINAL_BATCH_STATES)
    open_batches = service.journal(
        f"SELECT id, state FROM batches WHERE state NOT IN ({states}) LIMIT 10"
    )
    assert not open_batches, f"journal batches not terminal: {open_batches}"
    folders = {m["batch_id"] for m in manifests}
    in_journal = {
        row[0] for row in service.journal("SELECT id FROM batches WHERE state='published'")
    }
    assert in_journal == folders, (
        f"published in the journal, no folder: {sorted(in_journal - folders)[:5]}; "
        f"folder, not published in the journal: {sorted(folders - in_journal)[:5]}"
    )
    listed = {(m["batch_id"], i["name"], i["sha256"]) for m in manifests for i in m["inputs"]}
    rows = service.journal("SELECT batch_id, name, sha256 FROM files WHERE state='published'")
    missing = [r for r in rows if tuple(r) not in listed]
    assert not missing, f"journal says published, its batch's manifest disagrees: {missing[:5]}"
    sidecars = Counter((q["name"], q["sha256"]) for q in service.quarantined())
    rows = service.journal("SELECT name, coalesce(sha256, '') FROM files WHERE state='quarantined'")
    assert Counter(map(tuple, rows)) == sidecars, (
        f"quarantined rows {sorted(Counter(map(tuple, rows)).items())[:5]} != "
        f"sidecars {sorted(sidecars.items())[:5]}"
    )
    for sidecar in sorted(service.root.glob("quarantine/*/*.error.json")):
        quarantined = sidecar.with_name(sidecar.name.removesuffix(".error.json"))
        assert quarantined.exists() or quarantined.is_symlink(), f"no input beside {sidecar}"
        assert json.loads(sidecar.read_text()).get("reason"), f"no reason in {sidecar}"


def _check_audit(service: Service, manifests: list[dict[str, Any]]) -> None:
    """Chain intact up to the journal's head; exactly one `batch.published` per published folder;
    one line for each input's arrival and fate."""
    head = _journal_head(service)
    key = read_chain_key(service.root / "state")
    report = verify(service.outbox / "_audit", expected_head=head, key=key)
    assert report.ok, report.error
    lines = service.audit()
    published = Counter(a.get("batch_id") for a in lines if a.get("event") == "batch.published")
    folders = Counter(m["batch_id"] for m in manifests)
    wrong = {b: published[b] for b in set(published) | set(folders) if published[b] != folders[b]}
    assert not wrong, f"batch.published lines per published folder (want 1 each): {wrong}"
    by_event: dict[str, Counter[object]] = {}
    for a in lines:
        if "file_id" in a:
            by_event.setdefault(str(a["event"]), Counter())[a["file_id"]] += 1
    fates = {"published": None, "quarantined": "file.quarantined", "duplicate": "file.duplicate"}
    rows = service.journal("SELECT id, state, sha256 FROM files")
    for file_id, state, sha in rows:
        expect = {}
        if sha:  # claimed and hashed (a refused entry is never read)
            expect["file.received"] = 1
        if fates.get(state):
            expect[str(fates[state])] = 1
        for event, times in expect.items():
            got = by_event.get(event, Counter())[file_id]
            assert got == times, f"file {file_id} ({state}): {got} `{event}` audit lines"


def _journal_head(service: Service) -> tuple[int, str] | None:
    rows = service.journal("SELECT value FROM meta WHERE key='audit_head'")
    if not rows:
        return None
    stored = json.loads(rows[0][0])
    return (int(stored[0]), str(stored[1])) if stored and stored[0] else None

"""Outbox, worker side: a batch folder staged as `.tmp-<id>/`, its manifest, its atomic publish.

Runs in workers; the main process only removes stale staging folders after a crash.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from daemon.fsutil import FOLDER_MODE, fsync_dir, iso_utc, make_folder, sha256_of
from daemon.models import Batch, Facts, OutputFile, Provenance

FILE_MODE = 0o640
# A batch folder is private to the service until it is published whole (as mkstemp/mkdtemp).
STAGING_MODE = 0o700
TMP_PREFIX = ".tmp-"


def describe_outputs(folder: Path, names: Iterable[str]) -> tuple[OutputFile, ...]:
    return tuple(
        OutputFile(name, sha256_of(folder / name), (folder / name).stat().st_size)
        for name in sorted(names)
    )


def staging_folder(pipeline_dir: Path, batch_id: str) -> Path:
    """A fresh, hidden `.tmp-<batch id>/` beside where the batch will appear."""
    make_folder(pipeline_dir)
    tmp = pipeline_dir / f"{TMP_PREFIX}{batch_id}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(mode=STAGING_MODE)
    os.chmod(tmp, STAGING_MODE)
    return tmp


def build_manifest(
    batch: Batch,
    outputs: Iterable[OutputFile],
    facts: dict[int, Facts],
    quarantined: dict[int, tuple[str, str]],
    published_at: float,
    provenance: Provenance | None = None,
) -> dict[str, Any]:
    by_id = {f.file_id: f for f in batch.files}
    manifest: dict[str, Any] = {
        "batch_id": batch.batch_id,
        "pipeline": batch.pipeline,
        "kind": batch.kind,
        "priority": batch.priority,
        "attempt": batch.attempt,
        "sealed_at": iso_utc(batch.sealed_at),
        "published_at": iso_utc(published_at),
        "inputs": [
            {
                "name": by_id[i].name,
                "sha256": by_id[i].sha256,
                "size": by_id[i].size,
                "received_at": iso_utc(by_id[i].received_at),
                **facts[i],
            }
            for i in sorted(facts)
        ],
        "outputs": [{"name": o.name, "sha256": o.sha256, "size": o.size} for o in outputs],
        "quarantined": [
            {"name": by_id[i].name, "sha256": by_id[i].sha256, "reason": reason}
            for i, (reason, _) in sorted(quarantined.items())
        ],
    }
    if provenance is not None:
        manifest["provenance"] = provenance.as_json()
    return manifest


_ONE_LINE = json.JSONEncoder(ensure_ascii=True, separators=(", ", ": "))


def manifest_text(manifest: dict[str, Any]) -> str:
    """The manifest as JSON, indented, each list item (an input, an output) on a line of its
    own: easy to read and to grep, and written by the C encoder (`indent` makes json use its
    pure-Python one, ~20 µs a listed input)."""
    fields = []
    for key, value in manifest.items():
        if isinstance(value, list) and value:
            items = ",\n".join(f"    {_ONE_LINE.encode(item)}" for item in value)
            text = f"[\n{items}\n  ]"
        else:  # JSON text holds no raw newline: each one is a line break of the indentation
            text = json.dumps(value, indent=2, ensure_ascii=True).replace("\n", "\n  ")
        fields.append(f"  {_ONE_LINE.encode(key)}: {text}")
    return "{\n" + ",\n".join(fields) + "\n}\n"


def write_manifest(folder: Path, manifest: dict[str, Any]) -> None:
    (folder / "manifest.json").write_text(manifest_text(manifest), encoding="ascii")


def publish(tmp: Path, final: Path) -> None:
    """Make `tmp` visible as `final`, whole and durable: fsync files, rename, fsync the parent."""
    for entry in tmp.iterdir():
        # Never the mode a library or the umask chose (nor the input's): group-readable only.
        fd = os.open(entry, os.O_RDONLY | os.O_NOFOLLOW)
        try:
            os.fchmod(fd, FILE_MODE)
            os.fsync(fd)
        finally:
            os.close(fd)
    os.chmod(tmp, FOLDER_MODE)
    fsync_dir(tmp)
    os.rename(tmp, final)
    fsync_dir(final.parent)


def read_manifest(folder: Path) -> dict[str, Any] | None:
    """The manifest of a published folder, if its outputs are all there and match it."""
    try:
        manifest = json.loads((folder / "manifest.json").read_text(encoding="utf-8"))
        for out in manifest["outputs"]:
            if sha256_of(folder / out["name"]) != out["sha256"]:
                return None
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return dict(manifest)


def remove_stale_staging(pipeline_dirs: Iterable[Path], batch_id: str = "") -> int:
    """Delete `.tmp-<batch_id>*` folders (every `.tmp-*` by default) that a crash or a killed
    worker left behind; return how many."""
    removed = 0
    for folder in pipeline_dirs:
        if not folder.is_dir():
            continue
        for entry in folder.iterdir():
            if entry.name.startswith(TMP_PREFIX + batch_id) and entry.is_dir():
                shutil.rmtree(entry, ignore_errors=True)
                removed += 1
    return removed

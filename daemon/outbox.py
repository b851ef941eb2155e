"""Outbox: atomic folder publish and manifests (worker side); quarantine and archive (main side)."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from daemon.models import Batch, Facts, OutputFile

FOLDER_MODE = 0o750
FILE_MODE = 0o640
TMP_PREFIX = ".tmp-"


def iso(ts: float) -> str:
    """UTC ISO-8601 with milliseconds."""
    whole = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(ts))
    return f"{whole}.{int(ts * 1000) % 1000:03d}Z"


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        while chunk := fh.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def describe_outputs(folder: Path, names: Iterable[str]) -> tuple[OutputFile, ...]:
    return tuple(
        OutputFile(name, sha256_of(folder / name), (folder / name).stat().st_size)
        for name in sorted(names)
    )


def staging_folder(pipeline_dir: Path, batch_id: str) -> Path:
    """A fresh, hidden `.tmp-<batch id>/` beside where the batch will appear."""
    pipeline_dir.mkdir(parents=True, exist_ok=True, mode=FOLDER_MODE)
    tmp = pipeline_dir / f"{TMP_PREFIX}{batch_id}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(mode=FOLDER_MODE)
    return tmp


def build_manifest(
    batch: Batch,
    outputs: Iterable[OutputFile],
    facts: dict[int, Facts],
    quarantined: dict[int, tuple[str, str]],
    published_at: float,
) -> dict[str, Any]:
    by_id = {f.file_id: f for f in batch.files}
    return {
        "batch_id": batch.batch_id,
        "pipeline": batch.pipeline,
        "kind": batch.kind,
        "priority": batch.priority,
        "attempt": batch.attempt,
        "sealed_at": iso(batch.sealed_at),
        "published_at": iso(published_at),
        "inputs": [
            {
                "name": by_id[i].name,
                "sha256": by_id[i].sha256,
                "size": by_id[i].size,
                "received_at": iso(by_id[i].received_at),
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


def write_manifest(folder: Path, manifest: dict[str, Any]) -> None:
    path = folder / "manifest.json"
    path.write_text(json.dumps(manifest, indent=2, ensure_ascii=True) + "\n", encoding="utf-8")


def publish(tmp: Path, final: Path) -> None:
    """Make `tmp` visible as `final`, whole and durable: fsync files, rename, fsync the parent."""
    for entry in tmp.iterdir():
        os.chmod(entry, FILE_MODE)
        fd = os.open(entry, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
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


def move_aside(source: Path, folder: Path, name: str) -> Path:
    """Rename `source` into `folder` as `name` (never overwriting); return where it went."""
    folder.mkdir(parents=True, exist_ok=True, mode=FOLDER_MODE)
    target = folder / name
    n = 1
    while target.exists() or target.is_symlink():
        target = folder / f"{name}.{n}"
        n += 1
    os.rename(source, target)
    return target


def quarantine(source: Path, folder: Path, name: str, sidecar: dict[str, Any]) -> Path:
    """Move a refused input to `<quarantine>/<pipeline>/<name>` with `<name>.error.json`."""
    target = move_aside(source, folder, name)
    error = target.with_name(target.name + ".error.json")
    fd = os.open(error, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, FILE_MODE)
    with os.fdopen(fd, "w", encoding="utf-8") as fh:
        json.dump(sidecar, fh, indent=2, ensure_ascii=True)
        fh.write("\n")
    return target


def remove_stale_staging(pipeline_dirs: Iterable[Path]) -> int:
    """Delete `.tmp-*` folders a crash left behind; return how many."""
    removed = 0
    for folder in pipeline_dirs:
        if not folder.is_dir():
            continue
        for entry in folder.iterdir():
            if entry.name.startswith(TMP_PREFIX) and entry.is_dir():
                shutil.rmtree(entry, ignore_errors=True)
                removed += 1
    return removed


def discard(path: Path) -> None:
    with contextlib.suppress(FileNotFoundError):
        path.unlink()

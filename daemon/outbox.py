"""Outbox: atomic folder publish and manifests (worker side); quarantine and archive (main side)."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import stat
import time
import unicodedata
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from daemon.models import Batch, Facts, OutputFile

FOLDER_MODE = 0o750
FILE_MODE = 0o640
# A batch folder is private to the service until it is published whole (as mkstemp/mkdtemp).
STAGING_MODE = 0o700
TMP_PREFIX = ".tmp-"
SIDECAR_SUFFIX = ".error.json"
# NAME_MAX is 255 bytes: room for ".error.json" and a ".NNN" collision counter.
SAFE_NAME_MAX_BYTES = 200


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


def make_folder(folder: Path) -> None:
    """Create `folder` and any missing parent as FOLDER_MODE, whatever the umask (mkdir's
    `parents=True` would give the parents the default mode)."""
    missing = []
    while not folder.is_dir():
        missing.append(folder)
        folder = folder.parent
    for path in reversed(missing):
        with contextlib.suppress(FileExistsError):
            path.mkdir(mode=FOLDER_MODE)
            os.chmod(path, FOLDER_MODE)


def safe_name(name: str) -> str:
    """A file name that is safe to create and to show: `name` where it is plain printable text;
    otherwise '/', control and format characters (newline, ESC, bidi overrides) and bytes that
    were not UTF-8 written as escapes, a leading '-' guarded, and anything longer than
    SAFE_NAME_MAX_BYTES cut (with a hash of the whole, so that cut names stay apart)."""
    text = os.fsencode(name).decode("utf-8", "backslashreplace")
    out = []
    for char in text:
        if char == "/" or (unicodedata.category(char)[0] in "CZ" and char != " "):
            code = ord(char)
            out.append(f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}")
        else:
            out.append(char)
    text = "".join(out)
    if text.startswith(("-", ".")) or text in ("", ".", ".."):
        text = "_" + text
    if len(text.encode("utf-8")) > SAFE_NAME_MAX_BYTES:
        digest = hashlib.sha256(name.encode("utf-8", "surrogateescape")).hexdigest()[:12]
        suffix = Path(text).suffix
        suffix = suffix if len(suffix.encode("utf-8")) <= 16 else ""
        keep = SAFE_NAME_MAX_BYTES - len(digest) - 1 - len(suffix.encode("utf-8"))
        head = text.encode("utf-8")[:keep].decode("utf-8", "ignore")
        text = f"{head}~{digest}{suffix}"
    return text


def _restrict(path: Path) -> None:
    """Make a moved input FILE_MODE without following a link or opening a FIFO or device, and
    without touching a file that has another name elsewhere (its mode is that file's mode).
    Not ours to change when owned by another user: the folder's mode protects it then."""
    st = os.lstat(path)
    if not stat.S_ISREG(st.st_mode) or st.st_nlink != 1:
        return
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
        try:
            if os.fstat(fd).st_ino == st.st_ino:
                os.fchmod(fd, FILE_MODE)
        finally:
            os.close(fd)


def move_aside(source: Path, folder: Path, name: str) -> Path:
    """Rename `source` into `folder` as `safe_name(name)` (never overwriting), FILE_MODE;
    return where it went."""
    make_folder(folder)
    base = safe_name(name)
    target = folder / base
    n = 1
    while os.path.lexists(target) or os.path.lexists(f"{target}{SIDECAR_SUFFIX}"):
        target = folder / f"{base}.{n}"
        n += 1
    os.rename(source, target)
    _restrict(target)
    return target


def quarantine(source: Path, folder: Path, name: str, sidecar: dict[str, Any]) -> Path:
    """Move a refused input to `<quarantine>/<pipeline>/<name>` with `<name>.error.json`.

    `name` is made safe first (`safe_name`); the sidecar records the original name as data.
    """
    target = move_aside(source, folder, name)
    error = target.with_name(target.name + SIDECAR_SUFFIX)
    # Written aside and renamed: whoever reads the quarantine never sees half a sidecar.
    tmp = target.with_name(f".{target.name}{SIDECAR_SUFFIX}.tmp")
    flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW | os.O_CLOEXEC
    fd = os.open(tmp, flags, FILE_MODE)
    os.fchmod(fd, FILE_MODE)
    with os.fdopen(fd, "w", encoding="utf-8") as fh:
        json.dump(sidecar, fh, indent=2, ensure_ascii=True)
        fh.write("\n")
        fh.flush()
        os.fsync(fh.fileno())
    os.rename(tmp, error)
    return target


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


def discard(path: Path) -> None:
    with contextlib.suppress(FileNotFoundError):
        path.unlink()

"""The published files the status page links to, opened safely for the HTTP server's threads.

Only `<outbox>/<pipeline>/<batch id>/<name>` of a batch the journal records as published, where
every part matches its strict pattern (no `..`, no slash, no leading dot) and the file is a
regular file reached without following a symlink.
"""

from __future__ import annotations

import os
import re
import stat
from dataclasses import dataclass
from pathlib import Path

_PIPELINE = re.compile(r"[a-z0-9][a-z0-9_-]{0,63}")
_BATCH_ID = re.compile(r"\d{8}T\d{6}Z-[a-z0-9][a-z0-9_-]{0,63}-[0-9a-f]{8}")
_FILE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]{0,63}\.[a-z0-9]{1,8}")
CONTENT_TYPES = {
    "csv": "text/csv; charset=utf-8",
    "json": "application/json",
    "png": "image/png",
    "parquet": "application/vnd.apache.parquet",
}
PAGE_LINKS = ("result.csv", "result.parquet", "manifest.json")


@dataclass(frozen=True, slots=True)
class Download:
    fd: int
    size: int
    content_type: str


def parse_download_path(path: str) -> tuple[str, str, str] | None:
    """`/outbox/<pipeline>/<batch id>/<name>` → its three parts, or None if any is not valid."""
    parts = path.split("/")
    if len(parts) != 5 or parts[:2] != ["", "outbox"]:
        return None
    _, _, pipeline, batch_id, name = parts
    if not (
        _PIPELINE.fullmatch(pipeline)
        and _BATCH_ID.fullmatch(batch_id)
        and _FILE_NAME.fullmatch(name)
        and name.rsplit(".", 1)[1] in CONTENT_TYPES
    ):
        return None
    return pipeline, batch_id, name


def open_published(outbox: Path, pipeline: str, batch_id: str, name: str) -> Download | None:
    """An open descriptor on the published file, or None (missing, not regular, a symlink)."""
    flags = os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC
    fds: list[int] = []
    try:
        # Walk down one component at a time, never following a link on the way.
        fds.append(os.open(outbox, flags | os.O_DIRECTORY))
        for part in (pipeline, batch_id):
            fds.append(os.open(part, flags | os.O_DIRECTORY, dir_fd=fds[-1]))
        fd = os.open(name, flags | os.O_NONBLOCK, dir_fd=fds[-1])
    except OSError:
        return None
    finally:
        for parent in fds:
            os.close(parent)
    info = os.fstat(fd)
    if not stat.S_ISREG(info.st_mode):
        os.close(fd)
        return None
    return Download(fd, info.st_size, CONTENT_TYPES[name.rsplit(".", 1)[1]])

"""The last lines of the audit log, reduced to what the status page may show.

Runs in the HTTP server's threads and only reads. A line keeps its ids and event; a file name
only as the audit's keyed hash, a reason only as a reason code: never a raw name or free text.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from pathlib import Path

from daemon.audit.names import NAME_HASH_PREFIX

TAIL_LINES = 25
_TAIL_BYTES = 64 * 1024
_LOG_NAME = re.compile(r"audit-\d{4}-\d{2}-\d{2}\.jsonl")
REASON_CODE = re.compile(r"[a-z][a-z0-9_]{0,47}")
_BATCH_ID = re.compile(r"\d{8}T\d{6}Z-[a-z0-9][a-z0-9_-]*-[0-9a-f]{8}")
_PIPELINE = re.compile(r"[a-z0-9][a-z0-9_-]*")
_SHA256 = re.compile(r"[0-9a-f]{64}")
_EVENT = re.compile(r"[a-z][a-z_]*(\.[a-z_]+)+")


@dataclass(frozen=True, slots=True)
class AuditEntry:
    ts: str
    seq: int
    event: str
    pipeline: str | None
    batch_id: str | None
    file: str | None  # the keyed hash, shortened; never a raw name
    sha256: str | None  # shortened
    reason: str | None


def safe_reason(value: object) -> str | None:
    """A reason code as is; anything else (free text can quote a path) as "other"."""
    if value is None or value == "":
        return None
    return value if isinstance(value, str) and REASON_CODE.fullmatch(value) else "other"


def tail(folder: Path, n: int = TAIL_LINES) -> list[AuditEntry]:
    """The last `n` lines of the newest day's log, newest first (fewer early in a day)."""
    try:
        logs = sorted(e.name for e in os.scandir(folder) if _LOG_NAME.fullmatch(e.name))
    except FileNotFoundError:
        return []
    if not logs:
        return []
    entries = [_entry(raw) for raw in _last_lines(folder / logs[-1], n)]
    return [e for e in reversed(entries) if e is not None]


def _last_lines(path: Path, n: int) -> list[bytes]:
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    with os.fdopen(fd, "rb") as file:
        size = file.seek(0, os.SEEK_END)
        file.seek(max(0, size - _TAIL_BYTES))
        data = file.read(_TAIL_BYTES)
    lines = data.split(b"\n")
    # The first piece may be cut in the middle, the last one is being written (or empty).
    complete = lines[1:-1] if size > _TAIL_BYTES else lines[:-1]
    return complete[-n:]


def _entry(raw: bytes) -> AuditEntry | None:
    try:
        line = json.loads(raw)
    except ValueError:
        return None
    if not isinstance(line, dict):
        return None
    name = line.get("file")
    hashed = name if isinstance(name, str) and name.startswith(NAME_HASH_PREFIX) else None
    return AuditEntry(
        ts=str(line.get("ts", "")),
        seq=int(line.get("seq", 0)),
        event=_matching(_EVENT, line.get("event")) or "other",
        pipeline=_matching(_PIPELINE, line.get("pipeline")),
        batch_id=_matching(_BATCH_ID, line.get("batch_id")),
        file=None if hashed is None else hashed[: len(NAME_HASH_PREFIX) + 12],
        sha256=(_matching(_SHA256, line.get("sha256")) or "")[:12] or None,
        reason=safe_reason(line.get("reason")),
    )


def _matching(pattern: re.Pattern[str], value: object) -> str | None:
    return value if isinstance(value, str) and pattern.fullmatch(value) else None

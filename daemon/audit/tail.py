"""The last line of an audit file, where the writer goes on from: read from the end, a torn
tail cut off. Main process (the writer's start)."""

from __future__ import annotations

import json
import os
from datetime import datetime
from pathlib import Path

TAIL_CHUNK_BYTES = 64 * 1024


def parse_head(raw: bytes) -> tuple[int, str, int]:
    line = json.loads(raw)
    seq, digest, ts = line["seq"], line["hash"], line["ts"]
    if not (isinstance(seq, int) and isinstance(digest, str) and isinstance(ts, str)):
        raise TypeError("seq, hash or ts has the wrong type")
    return seq, digest, round(datetime.fromisoformat(ts).timestamp() * 1000)


def read_last_line(path: Path) -> tuple[bytes | None, int]:
    """The last newline-terminated line (without its newline) and the size of the torn tail."""
    with path.open("rb") as file:
        pos = file.seek(0, os.SEEK_END)
        buf = b""
        while pos > 0 and buf.count(b"\n") < 2:
            step = min(TAIL_CHUNK_BYTES, pos)
            pos -= step
            file.seek(pos)
            buf = file.read(step) + buf
    end = buf.rfind(b"\n")
    if end == -1:
        return None, len(buf)
    return buf[buf.rfind(b"\n", 0, end) + 1 : end], len(buf) - end - 1


def truncate(path: Path, size: int) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CLOEXEC)
    try:
        os.ftruncate(fd, size)
        os.fsync(fd)
    finally:
        os.close(fd)

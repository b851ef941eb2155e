"""The audit chain: canonical lines, their hashes, reading them back and `verify`.

Read-only; `medbatch audit verify` and the writer (to continue the chain) use it.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

GENESIS_HASH = "0" * 64
FILE_NAME = re.compile(r"audit-(\d{4}-\d{2}-\d{2})\.jsonl")
# Left by retention when it prunes old days: the last pruned line's seq and hash, where the
# remaining chain starts.
CHECKPOINT_NAME = "checkpoint.json"


@dataclass(frozen=True)
class VerifyReport:
    ok: bool
    lines: int
    files: int
    error: str | None = None
    torn_tail: bool = False
    from_checkpoint: int | None = None


def read_checkpoints(folder: Path) -> dict[int, str]:
    """seq → hash of the last line of each day retention pruned (empty when none was)."""
    try:
        data = json.loads((folder / CHECKPOINT_NAME).read_bytes())
    except FileNotFoundError:
        return {}
    entries = data.get("checkpoints") if isinstance(data, dict) else None
    if not isinstance(entries, list):
        raise ValueError(f"{CHECKPOINT_NAME}: no list of checkpoints")
    out: dict[int, str] = {}
    for entry in entries:
        seq, digest = (entry.get(k) for k in ("seq", "hash")) if isinstance(entry, dict) else (0, 0)
        if not (isinstance(seq, int) and isinstance(digest, str)):
            raise ValueError(f"{CHECKPOINT_NAME}: missing or invalid seq or hash")
        out[seq] = digest
    return out


def verify(folder: Path, expected_head: tuple[int, str] | None = None) -> VerifyReport:
    """Check seq continuity, the hash chain across files, each hash and each line's day; a chain
    whose older days were pruned starts at the recorded checkpoint."""
    files = sorted(folder.glob("audit-*.jsonl")) if folder.is_dir() else []
    try:
        checkpoints = read_checkpoints(folder)
    except ValueError as exc:
        return VerifyReport(False, 0, len(files), str(exc))
    checker = _ChainChecker(expected_head, checkpoints)
    try:
        for index, path in enumerate(files):
            checker.check_file(path, is_last=index == len(files) - 1)
        checker.check_end(files[-1].name if files else folder.name)
    except _ChainError as exc:
        return VerifyReport(False, checker.lines, len(files), str(exc), checker.torn_tail)
    return VerifyReport(
        True, checker.lines, len(files), None, checker.torn_tail, checker.started_at_checkpoint
    )


def read_lines(folder: Path, since_day: str = "") -> Iterator[dict[str, object]]:
    """Yield every complete line of every file in order (a torn tail is skipped); with
    `since_day` (`YYYY-MM-DD`), only the files of that day and later are read."""
    for path in log_files(folder):
        if path.name < f"audit-{since_day}":
            continue
        with path.open("rb") as file:
            for number, raw in enumerate(file, start=1):
                if not raw.endswith(b"\n"):
                    continue
                line = json.loads(raw)
                if not isinstance(line, dict):
                    raise ValueError(f"{path.name} line {number}: not a JSON object")
                yield line


class _ChainError(Exception):
    pass


class _ChainChecker:
    def __init__(
        self, expected_head: tuple[int, str] | None, checkpoints: dict[int, str] | None = None
    ) -> None:
        self.lines = 0
        self.started_at_checkpoint: int | None = None
        self._checkpoints = checkpoints or {}
        self.torn_tail = False
        self._seq = 0
        self._hash = GENESIS_HASH
        self._expected_head = expected_head

    def check_file(self, path: Path, *, is_last: bool) -> None:
        match = FILE_NAME.fullmatch(path.name)
        if match is None:
            raise _ChainError(f"{path.name}: file name is not audit-YYYY-MM-DD.jsonl")
        with path.open("rb") as file:
            for number, raw in enumerate(file, start=1):
                where = f"{path.name} line {number}"
                if not raw.endswith(b"\n"):
                    if not is_last:
                        raise _ChainError(f"{where}: unterminated line before the last file")
                    self.torn_tail = True
                    return
                self._check_line(where, match[1], raw)

    def check_end(self, name: str) -> None:
        if self._expected_head is not None and self._seq < self._expected_head[0]:
            raise _ChainError(
                f"{name}: log ends at seq {self._seq} "
                f"but the journal records seq {self._expected_head[0]}"
            )

    def _check_line(self, where: str, day: str, raw: bytes) -> None:
        try:
            line = json.loads(raw)
        except ValueError as exc:
            raise _ChainError(f"{where}: bad JSON") from exc
        if not isinstance(line, dict):
            raise _ChainError(f"{where}: bad JSON (not an object)")
        seq, prev, digest, ts = (line.get(key) for key in ("seq", "prev", "hash", "ts"))
        if not (isinstance(seq, int) and isinstance(prev, str) and isinstance(digest, str)):
            raise _ChainError(f"{where}: missing or invalid seq, prev or hash")
        if self.lines == 0 and seq != 1 and isinstance(seq, int) and seq - 1 in self._checkpoints:
            # Older days pruned: the chain continues from the checkpoint they left.
            self._seq, self._hash = seq - 1, self._checkpoints[seq - 1]
            self.started_at_checkpoint = self._seq
        if seq != self._seq + 1:
            raise _ChainError(f"{where}: seq {seq} expected {self._seq + 1}")
        if prev != self._hash:
            raise _ChainError(f"{where}: prev does not match previous hash")
        del line["hash"]
        if line_hash(prev, line) != digest:
            raise _ChainError(f"{where}: hash mismatch (line altered)")
        if not isinstance(ts, str) or ts[:10] != day:
            raise _ChainError(f"{where}: date of ts does not match file name")
        head = self._expected_head
        if head is not None and head[0] == seq and head[1] != digest:
            raise _ChainError(f"{where}: hash of seq {seq} differs from the journal's")
        if self._checkpoints.get(seq, digest) != digest:
            raise _ChainError(f"{where}: hash of seq {seq} differs from the pruning checkpoint")
        self._seq, self._hash = seq, digest
        self.lines += 1


def canonical(obj: dict[str, object]) -> str:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=True)


def line_hash(prev: str, line_without_hash: dict[str, object]) -> str:
    return hashlib.sha256((prev + canonical(line_without_hash)).encode("ascii")).hexdigest()


def log_files(folder: Path) -> list[Path]:
    return sorted(path for path in folder.glob("audit-*.jsonl") if FILE_NAME.fullmatch(path.name))

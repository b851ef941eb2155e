"""The audit chain: canonical lines, their keyed hashes, reading them back and `verify`.

Lines marked `"chain": "hmac-sha256"` are chained with the state's key; older unmarked lines
(plain SHA-256) are accepted only before the first keyed line. Read-only.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import re
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from daemon.fsutil import iso_utc_ms

GENESIS_HASH = "0" * 64
CHAIN_HMAC = "hmac-sha256"
# A line dated further ahead than this is refused: clocks of one host differ by less.
FUTURE_SKEW_S = 300.0
FILE_NAME = re.compile(r"audit-(\d{4}-\d{2}-\d{2})\.jsonl")


@dataclass(frozen=True)
class VerifyReport:
    ok: bool
    lines: int
    files: int
    error: str | None = None
    torn_tail: bool = False
    unkeyed_lines: int = 0


def verify(
    folder: Path,
    expected_head: tuple[int, str] | None = None,
    *,
    key: bytes | None = None,
    now: float | None = None,
) -> VerifyReport:
    """Check seq continuity, the (keyed) hash chain across files, each hash, each line's day
    and that no line is dated beyond FUTURE_SKEW_S past `now`."""
    files = sorted(folder.glob("audit-*.jsonl")) if folder.is_dir() else []
    latest = (time.time() if now is None else now) + FUTURE_SKEW_S
    checker = _ChainChecker(expected_head, key, iso_utc_ms(int(latest * 1000)))
    try:
        for index, path in enumerate(files):
            checker.check_file(path, is_last=index == len(files) - 1)
        checker.check_end(files[-1].name if files else folder.name)
    except _ChainError as exc:
        return VerifyReport(False, checker.lines, len(files), str(exc), checker.torn_tail)
    return VerifyReport(
        True, checker.lines, len(files), None, checker.torn_tail, checker.unkeyed_lines
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
        self, expected_head: tuple[int, str] | None, key: bytes | None, latest_ts: str
    ) -> None:
        self.lines = 0
        self.unkeyed_lines = 0
        self.torn_tail = False
        self._key = key
        self._latest_ts = latest_ts
        self._is_keyed = False
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
        if seq != self._seq + 1:
            raise _ChainError(f"{where}: seq {seq} expected {self._seq + 1}")
        if prev != self._hash:
            raise _ChainError(f"{where}: prev does not match previous hash")
        del line["hash"]
        self._check_hash(where, line, prev, digest)
        if not isinstance(ts, str) or ts[:10] != day:
            raise _ChainError(f"{where}: date of ts does not match file name")
        if ts > self._latest_ts:
            raise _ChainError(f"{where}: dated {ts}, in the future (later than {self._latest_ts})")
        head = self._expected_head
        if head is not None and head[0] == seq and head[1] != digest:
            raise _ChainError(f"{where}: hash of seq {seq} differs from the journal's")
        self._seq, self._hash = seq, digest
        self.lines += 1

    def _check_hash(self, where: str, line: dict[str, object], prev: str, digest: str) -> None:
        chain = line.get("chain")
        if chain is None:
            if self._is_keyed:
                raise _ChainError(f"{where}: unkeyed line after the keyed chain began (forged)")
            self.unkeyed_lines += 1
        elif chain != CHAIN_HMAC:
            raise _ChainError(f"{where}: unknown chain {chain!r}")
        elif self._key is None:
            raise _ChainError(f"{where}: keyed line, but no chain key to check it with")
        else:
            self._is_keyed = True
        if not hmac.compare_digest(line_hash(prev, line, self._key), digest):
            raise _ChainError(f"{where}: hash mismatch (line altered)")


def canonical(obj: dict[str, object]) -> str:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=True)


def line_hash(prev: str, line_without_hash: dict[str, object], key: bytes | None = None) -> str:
    """HMAC-SHA256 with `key` for a line marked keyed, plain SHA-256 for an older one."""
    data = (prev + canonical(line_without_hash)).encode("ascii")
    if line_without_hash.get("chain") == CHAIN_HMAC:
        if key is None:
            raise ValueError("a keyed audit line needs the chain key")
        return hmac.new(key, data, hashlib.sha256).hexdigest()
    return hashlib.sha256(data).hexdigest()


def log_files(folder: Path) -> list[Path]:
    return sorted(path for path in folder.glob("audit-*.jsonl") if FILE_NAME.fullmatch(path.name))

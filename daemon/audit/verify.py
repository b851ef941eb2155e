"""The audit chain: canonical lines, their keyed hashes, reading them back and `verify`.

Lines marked `"chain": "hmac-sha256"` are chained with the state's key; older unmarked lines
(plain SHA-256) are accepted only before the first keyed line. Read-only.
"""

from __future__ import annotations

import functools
import hashlib
import hmac
import json
import json.encoder
import re
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import cast

from daemon.fsutil import iso_utc_ms

GENESIS_HASH = "0" * 64
CHAIN_HMAC = "hmac-sha256"
# A line dated further ahead than this is refused: clocks of one host differ by less.
FUTURE_SKEW_S = 300.0
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
    unkeyed_lines: int = 0
    from_checkpoint: int | None = None


def checkpoint_mac(key: bytes, entry: dict[str, object]) -> str:
    """The HMAC retention writes beside a checkpoint: none can be made up without the key."""
    fields = {k: entry.get(k) for k in ("seq", "hash", "day")}
    return hmac.new(key, canonical(fields).encode("ascii"), hashlib.sha256).hexdigest()


def read_checkpoints(folder: Path) -> dict[int, dict[str, object]]:
    """seq → entry (`hash`, `day`, `mac`) of the last line of each day retention pruned."""
    try:
        data = json.loads((folder / CHECKPOINT_NAME).read_bytes())
    except FileNotFoundError:
        return {}
    entries = data.get("checkpoints") if isinstance(data, dict) else None
    if not isinstance(entries, list):
        raise ValueError(f"{CHECKPOINT_NAME}: no list of checkpoints")
    out: dict[int, dict[str, object]] = {}
    for entry in entries:
        seq, digest = (entry.get(k) for k in ("seq", "hash")) if isinstance(entry, dict) else (0, 0)
        if not (isinstance(seq, int) and isinstance(digest, str)):
            raise ValueError(f"{CHECKPOINT_NAME}: missing or invalid seq or hash")
        out[seq] = entry
    return out


def verify(
    folder: Path,
    expected_head: tuple[int, str] | None = None,
    *,
    key: bytes | None = None,
    now: float | None = None,
) -> VerifyReport:
    """Check seq continuity, the (keyed) hash chain across files, each hash, each line's day
    and that no line is dated beyond FUTURE_SKEW_S past `now`; a chain whose older days were
    pruned starts at the recorded (keyed) checkpoint."""
    files = sorted(folder.glob("audit-*.jsonl")) if folder.is_dir() else []
    try:
        checkpoints = read_checkpoints(folder)
    except ValueError as exc:
        return VerifyReport(False, 0, len(files), str(exc))
    latest = (time.time() if now is None else now) + FUTURE_SKEW_S
    checker = _ChainChecker(expected_head, key, iso_utc_ms(int(latest * 1000)), checkpoints)
    try:
        for index, path in enumerate(files):
            checker.check_file(path, is_last=index == len(files) - 1)
        checker.check_end(files[-1].name if files else folder.name)
    except _ChainError as exc:
        return VerifyReport(False, checker.lines, len(files), str(exc), checker.torn_tail)
    return VerifyReport(
        True,
        checker.lines,
        len(files),
        None,
        checker.torn_tail,
        checker.unkeyed_lines,
        checker.started_at_checkpoint,
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
        self,
        expected_head: tuple[int, str] | None,
        key: bytes | None,
        latest_ts: str,
        checkpoints: dict[int, dict[str, object]] | None = None,
    ) -> None:
        self.lines = 0
        self.unkeyed_lines = 0
        self.started_at_checkpoint: int | None = None
        self._checkpoints = checkpoints or {}
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
        if self.lines == 0 and seq != 1 and seq - 1 in self._checkpoints:
            # Older days pruned: the chain continues from the checkpoint they left.
            self._start_at_checkpoint(where, seq - 1, line)
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
        if self._checkpoints.get(seq, {"hash": digest})["hash"] != digest:
            raise _ChainError(f"{where}: hash of seq {seq} differs from the pruning checkpoint")
        self._seq, self._hash = seq, digest
        self.lines += 1

    def _start_at_checkpoint(self, where: str, seq: int, first: dict[str, object]) -> None:
        entry = self._checkpoints[seq]
        if first.get("chain") == CHAIN_HMAC:
            # A keyed chain's checkpoint is keyed too: deleting the first days and writing a
            # checkpoint for what is left needs the key.
            mac = entry.get("mac")
            if self._key is None:
                raise _ChainError(f"{where}: keyed checkpoint, but no chain key to check it with")
            if not (
                isinstance(mac, str) and hmac.compare_digest(checkpoint_mac(self._key, entry), mac)
            ):
                raise _ChainError(f"{where}: checkpoint of seq {seq} not signed with the chain key")
        self._seq, self._hash = seq, str(entry["hash"])
        self.started_at_checkpoint = seq

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


# Built once: json.dumps with any non-default option builds a new encoder on every call, and
# JSONEncoder.encode builds its C encoder on every call too. A line is a flat dict of strings,
# numbers, booleans and lists (no cycle to look for), so one C encoder serves every line.
_CANONICAL = json.JSONEncoder(sort_keys=True, separators=(",", ":"), ensure_ascii=True)


def _c_encoder() -> Callable[[object, int], Sequence[str]] | None:
    make = getattr(json.encoder, "c_make_encoder", None)
    if make is None:  # an interpreter without the C accelerator
        return None
    # markers (None: no cycle check), default, encoder, indent, key and item separators,
    # sort_keys, skipkeys, allow_nan: what _CANONICAL's own encode passes.
    encode = json.encoder.encode_basestring_ascii
    args = (None, _CANONICAL.default, encode, None, ":", ",", True, False, True)
    return cast(Callable[[object, int], Sequence[str]], make(*args))


_C_ENCODE = _c_encoder()


def canonical(obj: dict[str, object]) -> str:
    if _C_ENCODE is None:
        return _CANONICAL.encode(obj)
    return "".join(_C_ENCODE(obj, 0))


def line_hash(prev: str, line_without_hash: dict[str, object], key: bytes | None = None) -> str:
    """HMAC-SHA256 with `key` for a line marked keyed, plain SHA-256 for an older one."""
    is_keyed = line_without_hash.get("chain") == CHAIN_HMAC
    return text_hash(prev, canonical(line_without_hash), key if is_keyed else None, is_keyed)


def text_hash(prev: str, canonical_text: str, key: bytes | None, is_keyed: bool) -> str:
    """`line_hash` of a line already in canonical form."""
    data = (prev + canonical_text).encode("ascii")
    if is_keyed:
        if key is None:
            raise ValueError("a keyed audit line needs the chain key")
        keyed = _keyed(key).copy()  # the key's pads hashed once, not once a line
        keyed.update(data)
        return keyed.hexdigest()
    return hashlib.sha256(data).hexdigest()


@functools.lru_cache(maxsize=4)
def _keyed(key: bytes) -> hmac.HMAC:
    return hmac.new(key, digestmod="sha256")


def log_files(folder: Path) -> list[Path]:
    return sorted(path for path in folder.glob("audit-*.jsonl") if FILE_NAME.fullmatch(path.name))

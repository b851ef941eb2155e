"""The keyed (HMAC) audit chain: forgeries by someone who can write the folder but not read the
key fail `verify` at the forged line; future dates are refused and never adopted by the writer."""

from __future__ import annotations

import hashlib
import hmac
import json
import secrets
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path

import pytest

from daemon.audit import AuditEvent, AuditLog, load_chain_key, read_chain_key, verify
from daemon.audit.verify import CHAIN_HMAC, FUTURE_SKEW_S, canonical, text_hash

DAY = "2025-11-29"
NOW = datetime.fromisoformat(f"{DAY}T12:00:00").replace(tzinfo=UTC).timestamp()
KEY = bytes(range(32))
LOG = f"audit-{DAY}.jsonl"
Rows = list[dict[str, object]]


def clock_at(seconds: float) -> Callable[[], float]:
    return lambda: seconds


def write(folder: Path, count: int, key: bytes | None = KEY, at: float = NOW - 3600) -> None:
    with AuditLog(folder, clock=clock_at(at), chain_key=key) as log:
        for i in range(count):
            log.append(AuditEvent.FILE_RECEIVED, pipeline="emr", file=f"f{i}.csv")


def lines(folder: Path) -> list[dict[str, object]]:
    return [json.loads(raw) for raw in (folder / LOG).read_bytes().splitlines()]


def rewrite(folder: Path, rows: list[dict[str, object]]) -> None:
    (folder / LOG).write_bytes(b"".join((canonical(row) + "\n").encode() for row in rows))


def chained(prev: dict[str, object], fields: dict[str, object], digest: Callable[[bytes], str]):
    """A line an attacker appends after `prev`, hashed with `digest` (not the service's key)."""
    line: dict[str, object] = {"ts": prev["ts"], "seq": int(str(prev["seq"])) + 1, **fields}
    line["prev"] = prev["hash"]
    line["hash"] = digest((str(prev["hash"]) + canonical(line)).encode("ascii"))
    return line


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def other_hmac(data: bytes) -> str:
    return hmac.new(secrets.token_bytes(32), data, hashlib.sha256).hexdigest()


def test_keyed_lines_carry_the_marker_and_verify_only_with_the_key(tmp_path: Path) -> None:
    write(tmp_path, 5)
    assert {row["chain"] for row in lines(tmp_path)} == {CHAIN_HMAC}
    assert verify(tmp_path, key=KEY, now=NOW).ok
    report = verify(tmp_path, key=secrets.token_bytes(32), now=NOW)
    assert report.error == f"{LOG} line 1: hash mismatch (line altered)"
    report = verify(tmp_path, now=NOW)
    assert report.error == f"{LOG} line 1: keyed line, but no chain key to check it with"


EVENT = {"event": "file.published", "pipeline": "emr", "file": "forged.csv"}


@pytest.mark.parametrize(
    ("forge", "why"),
    [
        (lambda prev: chained(prev, EVENT, sha256), "unkeyed line after the keyed chain began"),
        (
            lambda prev: chained(prev, {**EVENT, "chain": CHAIN_HMAC}, sha256),
            "hash mismatch (line altered)",
        ),
        (
            lambda prev: chained(prev, {**EVENT, "chain": CHAIN_HMAC}, other_hmac),
            "hash mismatch (line altered)",
        ),
        (lambda prev: chained(prev, {**EVENT, "chain": "sha256"}, sha256), "unknown chain"),
    ],
    ids=["plain-sha256", "marked-sha256", "other-key", "other-chain-name"],
)
def test_appended_forgeries_fail_at_the_forged_line(
    tmp_path: Path, forge: Callable[[dict[str, object]], dict[str, object]], why: str
) -> None:
    """Lines appended (and re-chained) without the key: verify names the first forged one."""
    write(tmp_path, 4)
    rows = lines(tmp_path)
    first = forge(rows[-1])
    rewrite(tmp_path, [*rows, first, forge(first)])
    report = verify(tmp_path, key=KEY, now=NOW)
    assert not report.ok and report.error is not None
    assert report.error.startswith(f"{LOG} line 5: {why}")


def test_a_line_rechained_with_plain_sha256_in_the_middle_fails_there(tmp_path: Path) -> None:
    """Editing line 3 and re-chaining 3..end with plain SHA-256 (keeping the marker) fails at 3."""
    write(tmp_path, 6)
    rows = lines(tmp_path)
    forged = rows[:2]
    for row in rows[2:]:
        fields = {k: v for k, v in row.items() if k not in ("ts", "seq", "prev", "hash")}
        fields["file"] = "edited.csv"
        forged.append(chained(forged[-1], fields, sha256))
    rewrite(tmp_path, forged)
    assert verify(tmp_path, key=KEY, now=NOW).error == f"{LOG} line 3: hash mismatch (line altered)"


@pytest.mark.parametrize(
    ("edit", "expected"),
    [
        (lambda rows: [rows[0], rows[2], rows[1], *rows[3:]], "line 2: seq 3 expected 2"),
        (lambda rows: [rows[0], *rows[2:]], "line 2: seq 3 expected 2"),
        (lambda rows: rows[:-1], "ends at seq 4 but the journal records seq 5"),
    ],
    ids=["reordered", "removed", "cut-off-end"],
)
def test_reordered_and_removed_lines_fail_verify(
    tmp_path: Path,
    edit: Callable[[list[dict[str, object]]], list[dict[str, object]]],
    expected: str,
) -> None:
    write(tmp_path, 5)
    rows = lines(tmp_path)
    head = (5, str(rows[-1]["hash"]))
    rewrite(tmp_path, edit(rows))
    report = verify(tmp_path, expected_head=head, key=KEY, now=NOW)
    assert report.error is not None and expected in report.error


@pytest.mark.parametrize("ahead_s", [FUTURE_SKEW_S + 1, 86400 * 365])
def test_lines_dated_beyond_the_skew_are_refused(tmp_path: Path, ahead_s: float) -> None:
    """Even a correctly keyed line (a wrong clock) fails when dated past now + skew."""
    write(tmp_path, 2, at=NOW - 60)
    write(tmp_path, 1, at=NOW - 60 + ahead_s)
    report = verify(tmp_path, key=KEY, now=NOW - 60)
    future_file = max(p.name for p in tmp_path.glob("audit-*.jsonl"))
    line = 3 if future_file == LOG else 1
    assert report.lines == 2 and report.error is not None
    assert report.error.startswith(f"{future_file} line {line}: dated ")
    assert "in the future" in report.error


def test_lines_within_the_skew_are_accepted(tmp_path: Path) -> None:
    write(tmp_path, 2, at=NOW + FUTURE_SKEW_S - 5)
    assert verify(tmp_path, key=KEY, now=NOW).ok


def test_the_writer_never_adopts_a_forged_future_date(tmp_path: Path) -> None:
    """A forged last line dated next year: the writer's next line is dated now (+ skew at most)."""
    write(tmp_path, 2)
    rows = lines(tmp_path)
    future = chained(rows[-1], EVENT, sha256)
    future["ts"] = "2026-11-29T12:00:00.000Z"
    rewrite(tmp_path, [*rows, future])
    with AuditLog(tmp_path, clock=clock_at(NOW), chain_key=KEY) as log:
        line = log.append(AuditEvent.FILE_RECEIVED, pipeline="emr", file="next.csv")
    stamp = datetime.fromisoformat(str(line["ts"]).replace("Z", "+00:00")).timestamp()
    assert NOW <= stamp <= NOW + FUTURE_SKEW_S
    report = verify(tmp_path, key=KEY, now=NOW)
    assert report.error is not None and report.error.startswith(f"{LOG} line 3: ")


def test_unkeyed_history_then_keyed_lines_verify_across_the_switch(tmp_path: Path) -> None:
    """Migration: an older unkeyed log continues keyed; unkeyed lines are accepted only before."""
    write(tmp_path, 3, key=None)
    write(tmp_path, 3)
    rows = lines(tmp_path)
    assert ["chain" in row for row in rows] == [False] * 3 + [True] * 3
    report = verify(tmp_path, key=KEY, now=NOW)
    assert (report.ok, report.lines, report.unkeyed_lines) == (True, 6, 3)
    rewrite(tmp_path, [*rows, chained(rows[-1], EVENT, sha256)])
    assert verify(tmp_path, key=KEY, now=NOW).error == (
        f"{LOG} line 7: unkeyed line after the keyed chain began (forged)"
    )


def test_the_chain_key_is_created_once_private(tmp_path: Path) -> None:
    state = tmp_path / "state"
    assert read_chain_key(state) is None
    key = load_chain_key(state)
    assert len(key) == 32 and load_chain_key(state) == key
    assert ((state / "audit-chain.key").stat().st_mode & 0o777) == 0o600


AWKWARD_VALUES: list[object] = [
    "plain.csv",
    'quote " and backslash \\ and slash /',
    "new\nline\ttab\x00nul\x1bESC\x7fDEL",
    "é ü ß 中文 😀 \u202eRLO \ufeffBOM",
    "surrogate-escaped \udcff byte",
    "",
    0,
    -1,
    2**63,
    10**30,
    1.5,
    1e-300,
    True,
    False,
    None,
    ["a", 1, ["b", None]],
    [],
    {"nested": {"z": 1, "a": [True]}},
]


@pytest.mark.parametrize("value", AWKWARD_VALUES, ids=lambda v: repr(v)[:24])
def test_canonical_text_is_json_dumps_with_sorted_keys(value: object) -> None:
    """The line text hashed is exactly json.dumps(sort_keys, compact, ASCII) of the line, for
    every kind of value a line carries: one shared C encoder must not differ from it."""
    line = {"ts": "2026-12-01T00:00:00.000Z", "seq": 7, "event": "file.received", "v": value,
            "file": value, "Z": 1, "a": 2}  # fmt: skip
    expected = json.dumps(line, sort_keys=True, separators=(",", ":"), ensure_ascii=True)
    assert canonical(line) == expected
    assert canonical(line) == expected  # the encoder keeps no state between lines


def test_keyed_line_hash_is_hmac_sha256_of_prev_and_text_for_any_key() -> None:
    """The chain HMAC (its key's pads hashed once, then copied) equals a fresh HMAC-SHA256 of
    prev + canonical text, for several keys in turn and back again."""
    keys = [secrets.token_bytes(32) for _ in range(6)]
    for key in keys + keys[::-1]:
        for text in ('{"a":1}', '{"file":"\\u00e9"}', "x" * 5000):
            prev = secrets.token_hex(32)
            want = hmac.new(key, (prev + text).encode("ascii"), hashlib.sha256).hexdigest()
            assert text_hash(prev, text, key, True) == want
            assert text_hash(prev, text, None, False) == sha256((prev + text).encode("ascii"))

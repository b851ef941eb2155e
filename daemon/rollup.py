"""Rollups: per pipeline, one table across batches (per UTC day of publish, or all time), merged
exactly from each batch's statistics and re-published atomically after each publish. Main loop.

A batch's statistics are staged in the state folder before its journal commit and merged after
it; the period's state keeps the covered batch ids with the sums, so whatever crash comes in
between, each published batch is merged exactly once (`recover` finishes the job at start).
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import structlog

from daemon.config import Pipeline
from daemon.fsutil import atomic_write, iso_utc, sha256_of, utc_day
from daemon.models import Batch, BatchResult, BatchState

log = structlog.get_logger()

ROLLUP_FOLDER = "_rollup"
ALL = "all"
PRIVATE_MODE = 0o600  # sums of small groups: the service's eyes only, like the journal
FOLDER_MODE = 0o750  # published as batch folders are
FILE_MODE = 0o640
# Batches that may still publish: their staged statistics wait for the commit.
_MAY_PUBLISH = frozenset({BatchState.SEALED, BatchState.RUNNING})

Parts = list[Any]  # [count, sum, m2, min, max]; min and max None without values
_EMPTY: Parts = [0, 0.0, 0.0, None, None]
# Spec keys that must agree for two batches' groups to add up (`kind`: EMR shares have none).
_SAME = ("kind", "group_by", "missing")


def merge_parts(a: Parts, b: Parts) -> Parts:
    """Two columns' [count, sum, m2, min, max] as one, exactly (Chan et al.'s M2 update)."""
    (na, sa, m2a, lo_a, hi_a), (nb, sb, m2b, lo_b, hi_b) = a, b
    if not nb:
        return list(a)
    if not na:
        return list(b)
    n = na + nb
    delta = sb / nb - sa / na
    m2 = m2a + m2b + delta * delta * na * nb / n
    return [n, sa + sb, m2, _pick(min, lo_a, lo_b), _pick(max, hi_a, hi_b)]


def _pick(fn: Callable[[float, float], float], a: float | None, b: float | None) -> float | None:
    return b if a is None else a if b is None else fn(a, b)


@dataclass
class Period:
    """A period's running state: the batches it covers and each group's merged statistics."""

    batches: list[str] = field(default_factory=list)
    spec: dict[str, Any] = field(default_factory=dict)
    columns: list[str] = field(default_factory=list)
    groups: dict[str, dict[str, Any]] = field(default_factory=dict)
    # The batch the table started over from, when the grouping changed under it.
    restarted_at: str | None = None

    def is_compatible(self, spec: dict[str, Any]) -> bool:
        """Whether a batch of this spec adds up with the batches so far (same grouping column,
        rows with missing values counted the same way)."""
        return not self.batches or all(self.spec.get(k) == spec.get(k) for k in _SAME)

    def add(self, batch_id: str, partial: dict[str, Any]) -> bool:
        """Merge one batch's statistics, once: False if it is already covered."""
        if batch_id in self.batches:
            return False
        self.batches = sorted([*self.batches, batch_id])
        self.spec = dict(partial["spec"])
        for c in [*self.spec["columns"], *_columns_of(partial)]:
            if c not in self.columns:
                self.columns.append(c)
        for key, group in partial["groups"].items():
            mine = self.groups.setdefault(
                key, {"label": group["label"], "n": 0, "sources": 0, "columns": {}}
            )
            mine["n"] += group["n"]
            mine["sources"] += group["sources"]
            for c, parts in group["columns"].items():
                mine["columns"][c] = merge_parts(mine["columns"].get(c, _EMPTY), parts)
        return True

    def as_json(self) -> dict[str, Any]:
        return {"batches": self.batches, "spec": self.spec, "columns": self.columns,
                "groups": self.groups, "restarted_at": self.restarted_at}  # fmt: skip

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Period:
        return cls(list(data["batches"]), dict(data["spec"]), list(data["columns"]),
                   dict(data["groups"]), data.get("restarted_at"))  # fmt: skip


def _columns_of(partial: dict[str, Any]) -> list[str]:
    return list(dict.fromkeys(c for g in partial["groups"].values() for c in g["columns"]))


def render_csv(period: Period) -> str:
    """The rollup table, in result.csv's layout: the group, `n`, per column `n_<column>` (where
    the pipeline publishes it) and each mergeable statistic, then `suppressed` (where a
    small-cell rule applies). Small cells are suppressed as in a batch's result: label and
    numbers withheld, listed last. A `bare_statistics` spec (one value column, as genomics')
    names the statistics alone, as its result.csv does: `mean`, not `mean_expression`."""
    spec = period.spec
    keys = sorted(period.groups, key=lambda k: str(period.groups[k]["label"]))
    has_rule = min_cell_size(spec) is not None
    suppressed = _suppressed(period, keys) if has_rule else set()
    header = [spec.get("group_by", "group"), "n"]
    for c in period.columns:
        header += ([f"n_{c}"] if spec.get("with_n") else []) + [
            s if spec.get("bare_statistics") else f"{s}_{c}" for s in spec.get("statistics", [])
        ]
    lines = [",".join(_quote(h) for h in [*header, *(["suppressed"] if has_rule else [])])]
    rows = [k for k in keys if k not in suppressed] + [k for k in keys if k in suppressed]
    for key in rows:
        row = _row(period, key, key in suppressed)
        lines.append(",".join(row if has_rule else row[:-1]))
    return "\n".join(lines) + "\n"


def min_cell_size(spec: dict[str, Any]) -> int | None:
    """The small-cell rule's least rows; None for a kind without the rule (genomics). A spec
    without the key dates from before it was written down: the default then, 11."""
    size = spec.get("min_cell_size", 11)
    return None if size is None else int(size)


def _suppressed(period: Period, keys: list[str]) -> set[str]:
    """Fewer than min_cell_size rows or min_cell_sources inputs; a single small cell takes the
    next smallest with it, so it cannot be recovered by subtraction from the total."""
    size = min_cell_size(period.spec) or 0
    sources = int(period.spec.get("min_cell_sources", 1))
    groups = period.groups
    small = {k for k in keys if groups[k]["n"] < size or groups[k]["sources"] < sources}
    rest = [k for k in keys if k not in small]
    if len(small) == 1 and rest:
        small.add(min(rest, key=lambda k: groups[k]["n"]))
    return small


def _row(period: Period, key: str, is_suppressed: bool) -> list[str]:
    spec, group = period.spec, period.groups[key]
    size = min_cell_size(spec) or 0
    label = None if is_suppressed else _quote(str(group["label"]))
    cells = [label, None if is_suppressed else str(group["n"])]
    for c in period.columns:
        count, total, m2, lo, hi = group["columns"].get(c, _EMPTY)
        if spec.get("with_n"):
            cells.append(None if is_suppressed else str(count))
        values = {
            "mean": total / count if count else None,
            "std": math.sqrt(max(m2, 0.0) / (count - 1)) if count > 1 else None,
            "min": lo,
            "max": hi,
        }
        hidden = is_suppressed or count < size
        for name in spec.get("statistics", []):
            value = None if hidden else values[name]
            cells.append(None if value is None or math.isnan(value) else repr(float(value)))
    return [*(c if c is not None else '""' for c in cells), "true" if is_suppressed else "false"]


def _quote(text: str) -> str:
    return '"' + text.replace('"', '""') + '"'


class Rollups:
    """Stages, merges and publishes the rollup tables of the pipelines that keep one."""

    def __init__(
        self, state: Path, outbox: Path, pipelines: Callable[[], dict[str, Pipeline]]
    ) -> None:
        self._root = state / "rollup"
        self._outbox = outbox
        self._pipelines = pipelines

    # -- before the journal commit ------------------------------------------------------------

    def stage(self, batch: Batch, result: BatchResult) -> None:
        """Keep the batch's statistics durable before its commit (OSError if they cannot be)."""
        pipeline = self._pipelines().get(batch.pipeline)
        if result.rollup is None or pipeline is None or pipeline.rollup is None:
            return
        published_at = result.published_at or time.time()
        period = ALL if pipeline.rollup == ALL else utc_day(published_at)
        staged = {"batch_id": batch.batch_id, "period": period, "partial": result.rollup}
        folder = self._private(self._root / batch.pipeline / "staged")
        atomic_write(folder / f"{batch.batch_id}.json", _dumps(staged), PRIVATE_MODE)

    # -- after it ---------------------------------------------------------------------------

    def merge(self, pipeline: str, batch_id: str) -> bool:
        """Merge a published batch's staged statistics (once) and re-publish its period."""
        path = self._root / pipeline / "staged" / f"{batch_id}.json"
        try:
            staged = json.loads(path.read_bytes())
        except FileNotFoundError:
            return False
        period_name, partial = str(staged["period"]), staged["partial"]
        period = self.load(pipeline, period_name)
        if not period.is_compatible(partial["spec"]):
            # Groups of another column (or rows counted another way) cannot be added up: the
            # table starts over from this batch, and says so.
            log.warning("rollup.restarted", pipeline=pipeline, period=period_name,
                        batches_before=len(period.batches))  # fmt: skip
            period = Period(restarted_at=batch_id)
        if period.add(batch_id, partial):
            atomic_write(
                self._state_path(pipeline, period_name), _dumps(period.as_json()), PRIVATE_MODE
            )
        self.publish(pipeline, period_name, period)
        path.unlink()
        log.info(
            "rollup.published", pipeline=pipeline, period=period_name, batches=len(period.batches)
        )
        return True

    def merge_staged(self, pipeline: str, state_of: Callable[[str], str | None]) -> int:
        """Merge every staged share of a published batch of `pipeline` (the one just committed,
        and any a failed write left behind); drop those of batches that will never publish."""
        merged = 0
        for path in sorted((self._root / pipeline / "staged").glob("*.json")):
            state = state_of(path.stem)
            if state == BatchState.PUBLISHED:
                merged += self.merge(pipeline, path.stem)
            elif state not in _MAY_PUBLISH:
                path.unlink()
        return merged

    def recover(self, state_of: Callable[[str], str | None]) -> int:
        """At start: merge what a crash left staged for a published batch, drop what belongs to
        a batch that will never publish, and re-publish any table not up to date. Returns how
        many staged batches were merged."""
        for path in [*self._root.glob("*/.*.tmp"), *self._root.glob("*/staged/.*.tmp")]:
            path.unlink()  # a write a crash cut short; its target is whole or absent
        merged = sum(
            self.merge_staged(folder.parent.name, state_of)
            for folder in sorted(self._root.glob("*/staged"))
        )
        for path in sorted(self._root.glob("*/*.json")):
            self._republish_if_stale(path.parent.name, path.stem)
        return merged

    def load(self, pipeline: str, period: str) -> Period:
        path = self._state_path(pipeline, period)
        if not path.exists():
            return Period()
        return Period.from_json(json.loads(path.read_bytes()))

    def publish(self, pipeline: str, period_name: str, period: Period) -> None:
        """`<period>.csv`, then `<period>.json` naming the batches it covers and the CSV's
        sha256; each written whole (temporary, fsync, rename) in `_rollup/`."""
        folder = self._outbox / pipeline / ROLLUP_FOLDER
        for path in (folder.parent, folder):
            with contextlib.suppress(FileExistsError):
                path.mkdir(mode=FOLDER_MODE)
        os.chmod(folder, FOLDER_MODE)
        for path in folder.glob(".*.tmp"):
            path.unlink()
        table = folder / f"{period_name}.csv"
        atomic_write(table, render_csv(period).encode("utf-8"), FILE_MODE)
        about = {
            "pipeline": pipeline,
            "period": period_name,
            "batches": period.batches,
            "groups": len(period.groups),
            "statistics": period.spec.get("statistics", []),
            "min_cell_size": period.spec.get("min_cell_size"),
            **({"restarted_at": period.restarted_at} if period.restarted_at else {}),
            "csv_sha256": sha256_of(table),
            "updated_at": iso_utc(),
        }
        atomic_write(folder / f"{period_name}.json", _dumps(about, indent=2), FILE_MODE)

    def _republish_if_stale(self, pipeline: str, period_name: str) -> None:
        period = self.load(pipeline, period_name)
        about = self._outbox / pipeline / ROLLUP_FOLDER / f"{period_name}.json"
        try:
            is_current = json.loads(about.read_bytes())["batches"] == period.batches
        except (OSError, ValueError, KeyError, TypeError):
            is_current = False
        if not is_current:
            self.publish(pipeline, period_name, period)

    def _state_path(self, pipeline: str, period: str) -> Path:
        return self._private(self._root / pipeline) / f"{period}.json"

    def _private(self, folder: Path) -> Path:
        """`folder` and its parents up to `<state>/rollup`, each 0700 whatever the umask."""
        missing = []
        probe = folder
        while not probe.is_dir():
            missing.append(probe)
            if probe == self._root:
                break
            probe = probe.parent
        for path in reversed(missing):
            with contextlib.suppress(FileExistsError):
                path.mkdir(mode=0o700)
            os.chmod(path, 0o700)
        return folder


def _dumps(data: Any, indent: int | None = None) -> bytes:
    return (json.dumps(data, indent=indent, ensure_ascii=True) + "\n").encode()

"""SectionResult: what a benchmark section hands back, its figures and the targets they meet."""

from __future__ import annotations

import operator
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any, TypeVar

Figure = float | int | str | bool | None
T = TypeVar("T")

_COMPARE: dict[str, Callable[[float, float], bool]] = {
    ">=": operator.ge,
    "<": operator.lt,
    "<=": operator.le,
    "==": operator.eq,
}


@dataclass(frozen=True)
class Target:
    metric: str
    op: str  # one of _COMPARE
    threshold: float
    value: float | None

    @property
    def is_met(self) -> bool:
        return self.value is not None and _COMPARE[self.op](self.value, self.threshold)


@dataclass
class SectionResult:
    name: str
    figures: dict[str, Figure] = field(default_factory=dict)
    units: dict[str, str] = field(default_factory=dict)
    targets: list[Target] = field(default_factory=list)
    checks: dict[str, bool] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    error: str | None = None

    def add(self, metric: str, value: Figure, unit: str = "") -> None:
        self.figures[metric] = value
        if unit:
            self.units[metric] = unit

    def target(self, metric: str, op: str, threshold: float) -> None:
        value = self.figures.get(metric)
        number = float(value) if isinstance(value, int | float) else None
        self.targets.append(Target(metric, op, threshold, number))

    def check(self, name: str, is_ok: bool) -> None:
        self.checks[name] = is_ok

    def merge(self, other: SectionResult) -> None:
        """Take `other`'s figures and notes; a check holds only if it held in both."""
        self.figures.update(other.figures)
        self.units.update(other.units)
        self.notes += other.notes
        for name, is_ok in other.checks.items():
            self.checks[name] = self.checks.get(name, True) and is_ok

    @property
    def is_ok(self) -> bool:
        return (
            self.error is None and all(t.is_met for t in self.targets) and all(self.checks.values())
        )

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        data["targets"] = [{**asdict(t), "met": t.is_met} for t in self.targets]
        data["ok"] = self.is_ok
        return data


def best_of(
    repeat: int, measure: Callable[[SectionResult], T], result: SectionResult, wall_key: str
) -> T:
    """Run `measure` `repeat` times, each into a scratch result; keep the figures of the fastest
    (least disturbed by other work on the machine) and every run's checks; return its value."""
    return best_of_each(repeat, {wall_key: measure}, result)[wall_key]


def best_of_each(
    repeat: int, measures: dict[str, Callable[[SectionResult], T]], result: SectionResult
) -> dict[str, T]:
    """`best_of` for several sides at once (keyed by their wall figure), run in turn round by
    round, so that a slow spell of the machine falls on every side alike. A side that raises is
    dropped from later rounds (the exception is noted, its check failed)."""
    runs: dict[str, list[tuple[SectionResult, T]]] = {key: [] for key in measures}
    for _ in range(max(1, repeat)):
        for wall_key, measure in measures.items():
            if wall_key in runs:
                try:
                    scratch = SectionResult(result.name)
                    runs[wall_key].append((scratch, measure(scratch)))
                except Exception as exc:
                    del runs[wall_key]
                    side = wall_key.removesuffix("_wall_s")
                    result.notes.append(f"{side} failed: {type(exc).__name__}: {exc}"[:600])
                    result.check(f"{side}: run succeeded", False)
    values: dict[str, T] = {}
    for wall_key, side_runs in runs.items():
        best, values[wall_key] = min(
            side_runs, key=lambda run: float(run[0].figures.get(wall_key) or "inf")
        )
        result.merge(best)
        for scratch, _ in side_runs:
            for name, is_ok in scratch.checks.items():
                result.checks[name] = result.checks.get(name, True) and is_ok
        if repeat > 1:
            walls = ", ".join(str(scratch.figures.get(wall_key)) for scratch, _ in side_runs)
            result.notes.append(
                f"{result.name} {wall_key} over {repeat} runs, sides in turn: {walls} (best kept)"
            )
    return values

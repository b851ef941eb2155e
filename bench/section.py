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
    runs: list[tuple[SectionResult, T]] = []
    for _ in range(max(1, repeat)):
        scratch = SectionResult(result.name)
        runs.append((scratch, measure(scratch)))
    best, value = min(runs, key=lambda run: float(run[0].figures.get(wall_key) or "inf"))
    result.merge(best)
    for scratch, _ in runs:
        for name, is_ok in scratch.checks.items():
            result.checks[name] = result.checks.get(name, True) and is_ok
    if repeat > 1:
        walls = ", ".join(str(scratch.figures.get(wall_key)) for scratch, _ in runs)
        result.notes.append(f"{result.name} {wall_key} over {repeat} runs: {walls} (best kept)")
    return value

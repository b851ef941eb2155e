"""Pixel statistics that merge exactly (Chan et al.) and stay in bounded memory: a frame is
measured a block of rows at a time, so no whole float64 copy of it is made. Runs in workers."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np
from numpy.typing import NDArray

Stats = dict[str, float | None]
BLOCK_SAMPLES = 1 << 22  # 32 MiB of float64 at a time


@dataclass(frozen=True, slots=True)
class Moments:
    """Count, mean, sum of squared deviations, min and max."""

    n: int = 0
    mean: float = 0.0
    m2: float = 0.0
    low: float = math.inf
    high: float = -math.inf

    @classmethod
    def of(cls, values: NDArray[Any]) -> Moments:
        if values.size == 0:
            return cls()
        rows = values.reshape(values.shape[0], -1) if values.ndim > 1 else values.reshape(1, -1)
        step = max(1, BLOCK_SAMPLES // max(1, rows.shape[1]))
        total = cls()
        for start in range(0, rows.shape[0], step):
            total = total.combine(cls._of_block(rows[start : start + step]))
        return total

    @classmethod
    def _of_block(cls, block: NDArray[Any]) -> Moments:
        return cls(
            n=block.size,
            mean=float(np.mean(block, dtype=np.float64)),
            m2=float(np.var(block, dtype=np.float64)) * block.size,
            low=float(np.min(block)),
            high=float(np.max(block)),
        )

    def combine(self, other: Moments) -> Moments:
        n = self.n + other.n
        if not n:
            return self
        delta = other.mean - self.mean
        return Moments(
            n=n,
            mean=self.mean + delta * (other.n / n),
            m2=self.m2 + other.m2 + delta * delta * self.n * (other.n / n),
            low=min(self.low, other.low),
            high=max(self.high, other.high),
        )

    def stats(self, slope: float = 1.0, intercept: float = 0.0) -> Stats:
        """Population statistics of `value * slope + intercept` (a linear modality LUT)."""
        if not self.n:
            return {"mean": None, "std": None, "min": None, "max": None}
        ends = (self.low * slope + intercept, self.high * slope + intercept)
        return {
            "mean": self.mean * slope + intercept,
            "std": abs(slope) * math.sqrt(self.m2 / self.n),
            "min": min(ends),
            "max": max(ends),
        }

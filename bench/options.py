"""BenchOptions: what the command line chose (sizes, executors, cache and results folders)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

BENCH = Path(__file__).resolve().parent
RESULTS = BENCH / "results"


@dataclass(frozen=True)
class BenchOptions:
    quick: bool = False
    cache: Path = RESULTS / "cache"
    results: Path = RESULTS
    executors: tuple[str, ...] = ("process", "dask")
    workers: int = 2
    profile: bool = False
    repeat: int = 1  # throughput sections: best of N runs of each side
    # Small files, images, expression tables: each side's wall is 3 to 15 s, and this VM drifts
    # ±15 % from minute to minute, so every side (medbatch, Dask, naive, polars) is run this many
    # times, the sides in turn, and its fastest kept.
    short_repeat: int = 3
    # Sizes (full run / --quick).
    emr_files: int = 20000
    emr_rows: int = 50
    emr_max_files: int = 500
    latency_drops: int = 200
    big_files: int = 8
    big_file_mib: int = 250
    big_max_bytes_mib: int = 64
    scale_backlog: int = 100_000
    scale_growth: tuple[int, ...] = (1000, 10_000, 100_000)
    idle_s: float = 30.0
    images: int = 200
    genomics_files: int = 20
    genomics_genes: int = 20000  # a human table: ~20,000 protein-coding genes
    genomics_samples: int = 50
    genomics_max_files: int = 10

    def quick_sized(self) -> BenchOptions:
        """The sizes of a smoke run (`--quick`)."""
        return dataclasses.replace(
            self,
            quick=True,
            short_repeat=1,
            emr_files=1000,
            emr_max_files=100,
            latency_drops=30,
            big_files=4,
            big_file_mib=16,
            big_max_bytes_mib=8,
            scale_backlog=2000,
            scale_growth=(200, 2000),
            idle_s=5.0,
            images=40,
            genomics_files=4,
            genomics_max_files=2,
        )

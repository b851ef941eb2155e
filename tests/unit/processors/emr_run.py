"""An EMR processor's whole path in-process: read each table, merge, write; the result's path."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from daemon.processors.emr import EmrProcessor
from daemon.processors.options import EmrOptions


def emr_result(tmp_path: Path, tables: list[bytes], **options: Any) -> tuple[Path, list[Any]]:
    """`result.csv` of one batch of `tables` (each its own input), and each input's facts."""
    proc = EmrProcessor(EmrOptions(**options))
    partials, facts = [], []
    for i, content in enumerate(tables):
        path = tmp_path / f"in{i}.csv"
        path.write_bytes(content)
        partial, fact = proc.read(path, path.name)
        partials.append(partial)
        facts.append(fact)
    out = tmp_path / "out"
    out.mkdir(exist_ok=True)
    proc.write(proc.merge(partials), out)
    return out / "result.csv", facts

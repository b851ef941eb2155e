"""`kind = "linecount"`: counts the lines of text files; a bad (binary) file is quarantined."""

from __future__ import annotations

import csv
from collections.abc import Sequence
from pathlib import Path
from typing import ClassVar

from pydantic import BaseModel, ConfigDict

from daemon.processors.base import Facts, ProcessorError


class LineCountOptions(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    skip_blank: bool = True


class LineCountProcessor:
    kind: ClassVar[str] = "linecount"
    Options: ClassVar[type[LineCountOptions]] = LineCountOptions

    def __init__(self, options: LineCountOptions) -> None:
        self.options = options

    def read(self, path: Path, name: str) -> tuple[int, Facts]:
        data = path.read_bytes()
        if b"\0" in data:
            raise ProcessorError(path, "binary", "a NUL byte in a text file")
        lines = data.decode("utf-8", "replace").splitlines()
        if self.options.skip_blank:
            lines = [line for line in lines if line.strip()]
        return len(lines), {"lines": len(lines)}

    def merge(self, partials: Sequence[int]) -> int:
        return sum(partials)

    def write(self, merged: int, folder: Path) -> list[str]:
        with (folder / "result.csv").open("w", newline="") as fh:
            csv.writer(fh).writerows([["lines"], [merged]])
        return ["result.csv"]

"""The processor protocol. Processors run inside worker processes only."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any, ClassVar, Protocol

from pydantic import BaseModel, ConfigDict

from daemon.errors import ProcessorError
from daemon.models import Facts

__all__ = ["Facts", "NoOptions", "Processor", "ProcessorError"]


class NoOptions(BaseModel):
    """A processor without options."""

    model_config = ConfigDict(extra="forbid", frozen=True)


class Processor(Protocol):
    """Turns a batch of files into published results.

    The worker calls `read` once per input (a `ProcessorError` quarantines that input only), then
    `merge` over the partials of the inputs that were read, then `write` into the batch folder.
    `merge` must be associative: merging the partials of two halves gives the same result as
    merging all of them at once, so results are exact over the batch, however it is split.

    A processor may also have a static `preload_optional()`: it imports what only some options
    use, which a worker under a memory cap calls before the cap is set; and a `warm_up(folder)`
    class method: a tiny input of its own, read, merged and written into a scratch folder in the
    pool's initializer, so the first batch does not pay the libraries' first calls.
    """

    kind: ClassVar[str]
    Options: ClassVar[type[BaseModel]]

    def __init__(self, options: BaseModel) -> None: ...

    def read(self, path: Path, name: str) -> tuple[Any, Facts]:
        """Read one input; return a partial result and per-file facts (e.g. ``rows``)."""
        ...

    def merge(self, partials: Sequence[Any]) -> Any:
        """Combine partials (possibly none) into one."""
        ...

    def write(self, merged: Any, folder: Path) -> list[str]:
        """Write the result files into `folder`; return their names."""
        ...

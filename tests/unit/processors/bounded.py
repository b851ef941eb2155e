"""A processor's `read` in a spawned child whose address space is capped (RLIMIT_AS) a fixed
budget above what its imports take: a bomb that gets past a guard dies there as a MemoryError,
never on the test machine."""

from __future__ import annotations

import os
import re
import resource
from collections.abc import Callable, Iterator
from concurrent.futures import ProcessPoolExecutor
from contextlib import contextmanager
from multiprocessing import get_context
from pathlib import Path
from typing import Any

BUDGET_BYTES = 1 << 30
Outcome = tuple[str, str]  # ("read" | "quarantined" | "memory_error", reason or "")
Reader = Callable[..., Outcome]


def _address_space_bytes() -> int:
    found = re.search(r"VmSize:\s+(\d+) kB", Path("/proc/self/status").read_text())
    assert found is not None
    return int(found[1]) * 1024


def _cap() -> None:
    # Arrow's jemalloc keeps freed address space mapped, so that under RLIMIT_AS one test's
    # freed buffers would count against the next; with malloc they are given back.
    os.environ["ARROW_DEFAULT_MEMORY_POOL"] = "system"
    import daemon.processors.genomics  # noqa: F401 - imported before the cap, as a worker does
    from daemon.processors.imaging import ImagingProcessor

    ImagingProcessor.preload_optional()  # as a worker with a memory limit does

    limit = _address_space_bytes() + BUDGET_BYTES
    resource.setrlimit(resource.RLIMIT_AS, (limit, limit))


def _read(kind: str, options: dict[str, Any], path: str) -> Outcome:
    from daemon.errors import ProcessorError
    from daemon.processors import load_processor, options_model

    processor = load_processor(kind)(options_model(kind).model_validate(options))
    try:
        processor.read(Path(path), Path(path).name)
    except ProcessorError as exc:
        return "quarantined", exc.reason
    except MemoryError:
        return "memory_error", ""
    return "read", ""


def allocate(n_bytes: int) -> str:
    try:
        block = bytearray(n_bytes)
    except MemoryError:
        return "memory_error"
    return f"allocated {len(block)}"


@contextmanager
def bounded_reader() -> Iterator[tuple[Reader, Callable[[int], str]]]:
    """`read(kind, path, **options)` and `allocate(n_bytes)`, both run in the capped child."""
    with ProcessPoolExecutor(1, mp_context=get_context("spawn"), initializer=_cap) as pool:
        pool.submit(allocate, 1).result(timeout=120)  # start the child and its threads now

        def read(kind: str, path: Path, **options: Any) -> Outcome:
            return pool.submit(_read, kind, options, str(path)).result(timeout=120)

        def alloc(n_bytes: int) -> str:
            return pool.submit(allocate, n_bytes).result(timeout=120)

        yield read, alloc

"""How the process executor's workers start: their environment and their start method."""

from __future__ import annotations

import multiprocessing
import multiprocessing.context
import os
from collections.abc import Iterable

from daemon.processors import BUILTIN

# Set in the service's environment, which the fork server (and so every worker) inherits,
# unless the operator set them.
# NumPy asks for transparent huge pages for every array of 4 MiB or more (MADV_HUGEPAGE); where
# the kernel's THP defrag is "madvise" (Debian's default), such a fault compacts memory inline,
# and once a long-running host's memory is fragmented that doubled the workers' CPU on genomics
# tables (5.5 CPU-s against 2.7, bench/NOTES.md round 5). Read by NumPy when it is imported.
WORKER_ENVIRONMENT = {"NUMPY_MADVISE_HUGEPAGE": "0"}


def prepare_worker_environment() -> None:
    for name, value in WORKER_ENVIRONMENT.items():
        os.environ.setdefault(name, value)


def worker_context(kinds: Iterable[str]) -> multiprocessing.context.BaseContext:
    """Workers are forked from multiprocessing's fork server, which imports the worker and the
    built-in processors once (~0.8 CPU-s: pandas, pyarrow): two workers cost one import, and a
    replacement for a dead worker starts in milliseconds. Never forked from the main process,
    which runs threads. Plug-ins are imported by each worker's initializer."""
    context = multiprocessing.get_context("forkserver")
    modules = [BUILTIN[k].partition(":")[0] for k in sorted(set(kinds)) if k in BUILTIN]
    context.set_forkserver_preload(["daemon.worker", *modules])
    return context

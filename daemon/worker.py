"""The worker entry point: processor → merge → atomic publish → small summary back.

Runs inside a worker process (process pool or Dask). It reads only the batch's spooled inputs and
writes only `<outbox>/<pipeline>/.tmp-<batch id>/`, renamed to `<batch id>/` when whole.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import resource
import secrets
import shutil
import signal
import socket
import tempfile
import time
from collections.abc import Callable, Iterable, Sequence
from functools import cache
from pathlib import Path
from typing import Any, TypeVar, cast

import structlog

from daemon import __version__
from daemon.errors import BatchFailedError, ProcessorError
from daemon.fsutil import sync_file
from daemon.logs import configure_logging, contain_library_logs
from daemon.models import (
    BatchResult,
    BatchTask,
    Facts,
    IncomingFile,
    OutputFile,
    Provenance,
    Reason,
)
from daemon.outbox import (
    build_manifest,
    describe_outputs,
    publish,
    read_manifest,
    staging_folder,
    write_manifest,
)
from daemon.processors import load_processor, options_model
from daemon.processors.base import Processor

_T = TypeVar("_T")
log = structlog.get_logger()


def init_worker(kinds: Iterable[str] = (), memory_limit: int | None = None, nice: int = 0) -> None:
    """Pool initializer: Ctrl-C is for the main process (it drains); logs in the service's
    format, library records contained; `nice` steps below the service; preload the processors;
    then the memory ceiling. A start-up that fails says so, by the error's type only (pebble
    then ends the worker, and the executor waits longer before each next pool)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    configure_logging(os.environ.get("MEDBATCH_LOG_LEVEL", "INFO"))
    contain_library_logs()
    try:
        _start(tuple(kinds), memory_limit, nice)
    except BaseException as exc:
        log.error("worker.start_failed", error=type(exc).__name__)
        raise


def _start(kinds: tuple[str, ...], memory_limit: int | None, nice: int) -> None:
    if nice:
        _lower_priority(nice)
    for kind in kinds:
        processor = load_processor(kind)
        preload = getattr(processor, "preload_optional", None)
        if memory_limit is not None and preload is not None:
            preload()  # what some options load on first use would otherwise eat into the cap
        _warm_up(processor)
    # Under a cgroup limit (the unit's MemoryMax) the OOM killer takes a worker, never the
    # service: raising one's own score needs no privilege.
    with contextlib.suppress(OSError):
        Path("/proc/self/oom_score_adj").write_text("500")
    if memory_limit is not None:
        cap_address_space(memory_limit)


def _warm_up(processor: type[Processor]) -> None:
    """The processor's warm-up in a scratch folder: only a head start, so a failure (no
    writable temporary folder) is said and the worker starts all the same."""
    warm_up = getattr(processor, "warm_up", None)
    if warm_up is None:
        return
    started = time.perf_counter()
    try:
        with tempfile.TemporaryDirectory(prefix="medbatch-warm-up-") as folder:
            warm_up(Path(folder))
    except Exception as exc:
        log.warning("worker.warm_up_failed", kind=processor.kind, error=type(exc).__name__)
        return
    ms = round(1000 * (time.perf_counter() - started))
    log.debug("worker.warmed_up", kind=processor.kind, ms=ms)


def _lower_priority(steps: int) -> None:
    """`nice` steps below the service; where a sandbox forbids it (a unit whose system call
    filter takes setpriority away), the worker runs at the service's priority, said once."""
    try:
        os.nice(steps)
    except OSError as exc:
        log.warning("worker.nice_refused", nice=steps, errno=errno.errorcode.get(exc.errno or 0))


def cap_address_space(limit: int) -> None:
    """RLIMIT_AS at what this process maps now plus `limit`. Arrow's allocator (jemalloc) keeps
    freed address space mapped, so the system allocator is used instead: under the cap, freed
    memory must be free again."""
    import pyarrow as pa

    pa.set_memory_pool(pa.system_memory_pool())
    status = Path("/proc/self/status").read_text()
    mapped = next(
        int(line.split()[1]) * 1024 for line in status.splitlines() if line.startswith("VmSize:")
    )
    _, hard = resource.getrlimit(resource.RLIMIT_AS)
    soft = mapped + limit if hard == resource.RLIM_INFINITY else min(hard, mapped + limit)
    resource.setrlimit(resource.RLIMIT_AS, (soft, hard))


def warm_up() -> int:
    return 0


@cache
def _processor(kind: str, options_json: str) -> Processor:
    options = options_model(kind).model_validate(json.loads(options_json))
    return load_processor(kind)(options)


Outcomes = list[Facts | ProcessorError]


def run_batch(task: BatchTask) -> BatchResult:
    # On a Dask worker no initializer of ours ran: contain the libraries' logs here (once).
    contain_library_logs()
    return _plain_errors(_run, task)


def read_part(task: BatchTask, file_ids: tuple[int, ...]) -> tuple[list[Any], Outcomes]:
    """A split batch's share (13.3): read only these inputs; `finish_batch` merges the shares."""
    return _plain_errors(_read_part, task, frozenset(file_ids))


def finish_batch(task: BatchTask, partials: list[Any], outcomes: Outcomes) -> BatchResult:
    """A split batch's last step: the shares' partials and outcomes, in the batch's file order."""
    return _plain_errors(_finish, task, _processor_for(task), partials, outcomes)


def _plain_errors(fn: Callable[..., _T], *args: Any) -> _T:
    try:
        return fn(*args)
    except (ProcessorError, BatchFailedError):
        raise
    except OSError as exc:
        # Errors cross the process boundary pickled: keep them plain (CPython bpo-31699).
        is_full = exc.errno in (errno.ENOSPC, errno.EDQUOT)
        reason = Reason.DISK_FULL if is_full else Reason.IO_ERROR
        raise BatchFailedError(reason, f"{exc.__class__.__name__} errno={exc.errno}") from None
    except MemoryError:
        raise BatchFailedError("out_of_memory") from None
    except Exception as exc:
        raise BatchFailedError("processor_failed", type(exc).__name__) from None


def _read_inputs(
    processor: Processor, files: Sequence[IncomingFile]
) -> tuple[list[Any], list[Facts | ProcessorError]]:
    """Partials and one outcome per input; a processor may read the batch at once."""
    read_many = getattr(processor, "read_many", None)
    if read_many is not None:
        try:
            return cast(
                tuple[list[Any], list[Facts | ProcessorError]],
                read_many([(Path(f.spool_path), f.name) for f in files]),
            )
        except Exception:  # noqa: S110 - file by file below names the input that fails
            pass
    partials: list[Any] = []
    outcomes: list[Facts | ProcessorError] = []
    for f in files:
        path = Path(f.spool_path)
        try:
            partial, facts = processor.read(path, f.name)
        except ProcessorError as exc:
            outcomes.append(exc)
            continue
        except MemoryError:
            outcomes.append(
                ProcessorError(path, "out_of_memory", "reading it took more memory than free")
            )
            continue
        except Exception as exc:
            outcomes.append(ProcessorError(path, "unreadable", type(exc).__name__))
            continue
        partials.append(partial)
        outcomes.append(facts)
    return partials, outcomes


def _processor_for(task: BatchTask) -> Processor:
    return _processor(task.batch.kind, json.dumps(task.options, sort_keys=True))


def _read_part(task: BatchTask, file_ids: frozenset[int]) -> tuple[list[Any], Outcomes]:
    files = [f for f in task.batch.files if f.file_id in file_ids]
    return _read_inputs(_processor_for(task), files)


def _run(task: BatchTask) -> BatchResult:
    processor = _processor_for(task)
    partials, outcomes = _read_inputs(processor, task.batch.files)
    return _finish(task, processor, partials, outcomes)


def _finish(
    task: BatchTask, processor: Processor, partials: list[Any], outcomes: Outcomes
) -> BatchResult:
    batch = task.batch
    facts: dict[int, Facts] = {}
    quarantined: dict[int, tuple[str, str]] = {}
    for f, outcome in zip(batch.files, outcomes, strict=True):
        if not isinstance(outcome, ProcessorError):
            facts[f.file_id] = outcome
        elif f.is_suspect_incomplete:
            quarantined[f.file_id] = (
                Reason.INCOMPLETE,
                f"its writer never closed it ({outcome.reason})",
            )
        else:
            quarantined[f.file_id] = (outcome.reason, outcome.detail)
    if not partials:
        return BatchResult(batch.batch_id, None, None, quarantined=quarantined)

    final = task.outbox_dir / batch.batch_id
    merged = processor.merge(partials)
    rollup = _rollup_partial(task, processor, merged)
    earlier = read_manifest(final)
    if earlier is not None:
        # An earlier attempt published it and died before the journal heard: keep that one.
        return _earlier_result(batch.batch_id, final, earlier, facts, quarantined, rollup)
    provenance = provenance_of(task)
    if final.exists():
        shutil.rmtree(final)
    # One staging folder per attempt: after a lost connection, an old attempt may still run
    # beside its retry (Dask), and neither must write into the other's files.
    tmp = staging_folder(task.outbox_dir, f"{batch.batch_id}-{secrets.token_hex(4)}")
    try:
        outputs = describe_outputs(tmp, processor.write(merged, tmp))
        published_at = time.time()
        manifest = build_manifest(batch, outputs, facts, quarantined, published_at, provenance)
        write_manifest(tmp, manifest)
        if task.journal_wal is not None:
            sync_file(task.journal_wal)  # the seal and running mark, before anything is seen
        publish(tmp, final)
    except OSError:
        shutil.rmtree(tmp, ignore_errors=True)
        earlier = read_manifest(final)
        if earlier is None:
            raise
        # The other attempt won the rename: its folder is whole and equivalent; use it.
        return _earlier_result(batch.batch_id, final, earlier, facts, quarantined, rollup)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return BatchResult(
        batch.batch_id, final, published_at, outputs, facts, quarantined, provenance, rollup
    )


def _rollup_partial(task: BatchTask, processor: Processor, merged: Any) -> dict[str, Any] | None:
    """The merged statistics as plain JSON, for a pipeline that keeps a rollup (and a processor
    that can give them)."""
    make = getattr(processor, "rollup_partial", None)
    if not task.wants_rollup or make is None:
        return None
    return cast(dict[str, Any], make(merged))


def provenance_of(task: BatchTask) -> Provenance:
    """This worker's version and host, with the task's options (after defaults) and config."""
    return Provenance(
        version=__version__,
        kind=task.batch.kind,
        options=task.options,
        config_sha256=task.config_sha256,
        host=socket.gethostname(),
    )


def _earlier_result(
    batch_id: str,
    final: Path,
    earlier: dict[str, Any],
    facts: dict[int, Facts],
    quarantined: dict[int, tuple[str, str]],
    rollup: dict[str, Any] | None,
) -> BatchResult:
    """A folder published by an earlier attempt stands, with its outputs and provenance (its
    rollup statistics are this attempt's: the same inputs give the same numbers)."""
    outputs = tuple(OutputFile(**o) for o in earlier["outputs"])
    provenance = Provenance.from_json(earlier.get("provenance"))
    return BatchResult(
        batch_id, final, time.time(), outputs, facts, quarantined, provenance, rollup
    )

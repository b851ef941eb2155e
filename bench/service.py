"""The real service as a subprocess over a temp folder tree: config, start, ready, stop, CPU use,
and what it published and audited. Every process of its session is killed on exit, always."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from types import TracebackType
from typing import Any

from bench.cpu import CpuSampler
from bench.procstats import ProcessSampler, ProcStat

REPO = Path(__file__).resolve().parents[1]


def toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str | Path):
        return json.dumps(str(value))
    if isinstance(value, list | tuple):
        return "[" + ", ".join(toml_value(v) for v in value) + "]"
    return repr(value)


def render_config(
    root: Path,
    pipelines: Sequence[Mapping[str, Any]],
    sections: Mapping[str, Mapping[str, Any]],
) -> str:
    paths = {key: root / key for key in ("inbox", "outbox", "state", "quarantine")}
    lines = []
    for section, values in {"paths": paths, **sections}.items():
        lines.append(f"[{section}]")
        lines += [f"{k} = {toml_value(v)}" for k, v in values.items()]
    for pipeline in pipelines:
        lines.append("[[pipeline]]")
        lines += [f"{k} = {toml_value(v)}" for k, v in pipeline.items()]
    return "\n".join(lines) + "\n"


@contextlib.contextmanager
def temp_root(prefix: str) -> Iterator[Path]:
    """A scratch folder, removed afterwards; the removal (tens of thousands of files after a
    small-file run) is written back before the next measurement starts, not on its clock."""
    root = Path(tempfile.mkdtemp(prefix=f"medbatch-bench-{prefix}-"))
    try:
        yield root
    finally:
        shutil.rmtree(root, ignore_errors=True)
        os.sync()


def parse_ts(text: str) -> float:
    """An ISO-8601 UTC timestamp (audit `ts` or structlog `timestamp`) as epoch seconds."""
    return datetime.fromisoformat(text.replace("Z", "+00:00")).timestamp()


def read_json_lines(path: Path) -> list[dict[str, Any]]:
    lines = []
    if path.exists():
        for line in path.read_text(errors="replace").splitlines():
            with contextlib.suppress(ValueError):
                record = json.loads(line)
                if isinstance(record, dict):
                    lines.append(record)
    return lines


class ServiceTree:
    """A config and its folders under one temp root."""

    def __init__(
        self,
        root: Path,
        pipelines: Sequence[Mapping[str, Any]],
        **sections: Mapping[str, Any],
    ) -> None:
        self.root = root
        self.config = root / "medbatch.toml"
        self.config.write_text(render_config(root, pipelines, sections))
        for pipeline in pipelines:
            self.inbox(str(pipeline["name"])).mkdir(parents=True, exist_ok=True)

    def inbox(self, pipeline: str) -> Path:
        return self.root / "inbox" / pipeline

    def outbox(self, pipeline: str) -> Path:
        return self.root / "outbox" / pipeline

    def command(self, *args: str) -> list[str]:
        return [sys.executable, "-m", "daemon", *args, "--config", str(self.config)]

    def published(self, pipeline: str) -> list[Path]:
        folder = self.outbox(pipeline)
        if not folder.exists():
            return []
        return sorted(p for p in folder.iterdir() if not p.name.startswith((".", "_")))

    def manifests(self, pipeline: str) -> list[dict[str, Any]]:
        return [json.loads((p / "manifest.json").read_text()) for p in self.published(pipeline)]

    def audit(self) -> list[dict[str, Any]]:
        lines = []
        for path in sorted((self.root / "outbox" / "_audit").glob("audit-*.jsonl")):
            lines += read_json_lines(path)
        return lines

    def quarantined(self) -> int:
        return len(list((self.root / "quarantine").glob("*/*.error.json")))

    def audit_span_s(self) -> tuple[float, float] | None:
        """(first `file.received`, last `batch.published`) from the audit log, epoch seconds."""
        lines = self.audit()
        received = [parse_ts(x["ts"]) for x in lines if x.get("event") == "file.received"]
        published = [parse_ts(x["ts"]) for x in lines if x.get("event") == "batch.published"]
        if not received or not published:
            return None
        return min(received), max(published)

    def batch_seconds(self) -> tuple[float, float] | None:
        """(sum over batches of `batch.started` → `batch.published`, first start → last publish):
        how long batches were in flight, against the window they ran in."""
        started: dict[str, float] = {}
        published: dict[str, float] = {}
        for line in self.audit():
            if line.get("event") == "batch.started":
                started.setdefault(line["batch_id"], parse_ts(line["ts"]))
            elif line.get("event") == "batch.published":
                published[line["batch_id"]] = parse_ts(line["ts"])
        done = [b for b in published if b in started]
        if not done:
            return None
        in_flight = sum(published[b] - started[b] for b in done)
        window = max(published[b] for b in done) - min(started[b] for b in done)
        return in_flight, max(window, 1e-3)

    def audit_verify(self) -> bool:
        done = subprocess.run(
            self.command("audit", "verify"), cwd=REPO, capture_output=True, check=False
        )
        return done.returncode == 0


class ServiceProcess:
    """`medbatch run [...]` in its own session; stderr (JSON logs) to a file in the tree."""

    def __init__(self, tree: ServiceTree, *args: str, wrapper: Sequence[str] = ()) -> None:
        self.tree = tree
        self.stderr_path = tree.root / "service.stderr.jsonl"
        self.started_at = time.time()
        self._started = time.perf_counter()
        with self.stderr_path.open("wb") as stderr:
            self.process = subprocess.Popen(
                [*wrapper, *tree.command("run", *args)],
                cwd=REPO,
                stdout=subprocess.DEVNULL,
                stderr=stderr,
                start_new_session=True,
            )

    @property
    def pid(self) -> int:
        return self.process.pid

    def __enter__(self) -> ServiceProcess:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.kill()

    def logs(self) -> list[dict[str, Any]]:
        return read_json_lines(self.stderr_path)

    def log_time(self, event: str) -> float | None:
        """When the service logged `event` (epoch seconds), if it did."""
        for line in self.logs():
            if line.get("event") == event and "timestamp" in line:
                return parse_ts(str(line["timestamp"]))
        return None

    def wait_ready(self, timeout_s: float = 60, event: str = "daemon.ready") -> float:
        """Block until `event` (by default `daemon.ready`) is logged; return seconds since
        launch."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"service exited {self.process.returncode}: {self.tail()}")
            if any(line.get("event") == event for line in self.logs()):
                return time.perf_counter() - self._started
            time.sleep(0.02)
        raise TimeoutError(f"no {event} within {timeout_s} s: {self.tail()}")

    def wait(self, timeout_s: float) -> tuple[int, float]:
        """Wait for exit; (exit status, seconds since launch)."""
        code = self.process.wait(timeout=timeout_s)
        return code, time.perf_counter() - self._started

    def terminate(self, timeout_s: float = 60) -> int:
        """SIGTERM (drain) and wait for the exit status."""
        self.process.send_signal(signal.SIGTERM)
        return self.process.wait(timeout=timeout_s)

    def kill(self) -> None:
        """kill -9 every process of the session (the service and its workers), if any is left."""
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.process.pid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.process.wait(timeout=10)

    def tail(self, n_lines: int = 5) -> str:
        if not self.stderr_path.exists():
            return ""
        return " | ".join(self.stderr_path.read_text(errors="replace").splitlines()[-n_lines:])


@dataclass(frozen=True)
class OnceRun:
    """One `run --once`, timed from process start to exit, and its timeline (epoch seconds) from
    the service's own log (`daemon.ready`) and audit log (ms resolution)."""

    wall_s: float
    main_cpu_s: float
    workers_cpu_s: float
    launched_at: float
    ready_at: float | None = None
    first_received_at: float | None = None
    last_published_at: float | None = None
    batch_seconds: tuple[float, float] | None = None  # ServiceTree.batch_seconds
    processes: tuple[ProcStat, ...] = ()  # peak RSS and CPU of the service and each child

    @property
    def main_peak_rss_mib(self) -> float | None:
        return next((p.peak_rss_mib for p in self.processes if p.role == "main"), None)

    @property
    def workers(self) -> list[ProcStat]:
        return [p for p in self.processes if p.role == "worker"]

    @property
    def first_claim_s(self) -> float | None:
        """Launch → first `file.received` audit line: start-up to the first claim."""
        return _between(self.launched_at, self.first_received_at)

    @property
    def cpu_s(self) -> tuple[float, float]:
        return self.main_cpu_s, self.workers_cpu_s

    @property
    def startup_s(self) -> float | None:
        """Launch → `daemon.ready` (imports, journal, workers spawned and warm, inbox scanned)."""
        return _between(self.launched_at, self.ready_at)

    @property
    def claim_s(self) -> float | None:
        """`daemon.ready` → first `file.received` audit line (claims are audited as a group)."""
        return _between(self.ready_at, self.first_received_at)

    @property
    def steady_s(self) -> float | None:
        """First `file.received` → last `batch.published`."""
        return _between(self.first_received_at, self.last_published_at)

    @property
    def shutdown_s(self) -> float | None:
        """Last `batch.published` → process exit."""
        return _between(self.last_published_at, self.launched_at + self.wall_s)


def _between(start: float | None, end: float | None) -> float | None:
    return None if start is None or end is None else max(end - start, 1e-3)


def run_once(
    tree: ServiceTree,
    timeout_s: float,
    wrapper: Sequence[str] = (),
    remote_workers: Sequence[int] = (),
) -> OnceRun:
    """`medbatch run --once` over what is in the inboxes; raise unless it exits 0.

    `remote_workers`: processes outside the service that run its batches (a Dask cluster);
    their CPU (and their children's) while it runs counts as the workers'.
    """
    with ServiceProcess(tree, "--once", wrapper=wrapper) as service:
        samplers = [CpuSampler(pid) for pid in (service.pid, *remote_workers)]
        memory = ProcessSampler(service.pid)
        try:
            code, wall_s = service.wait(timeout_s)
        finally:
            readings = [sampler.stop() for sampler in samplers]
            processes = tuple(memory.stop())
        main_cpu_s, workers_cpu_s = readings[0]
        workers_cpu_s += sum(own + children for own, children in readings[1:])
        if code != 0:
            raise RuntimeError(f"run --once exited {code}: {service.tail(2)}")
        ready_at = service.log_time("daemon.ready")
    span = tree.audit_span_s()
    first, last = span if span is not None else (None, None)
    return OnceRun(
        wall_s,
        main_cpu_s,
        workers_cpu_s,
        service.started_at,
        ready_at,
        first,
        last,
        tree.batch_seconds(),
        processes,
    )

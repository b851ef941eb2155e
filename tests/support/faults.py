"""Fault injection for the system tier: a small tmpfs, a sysctl, SIGSTOP, process sessions, seeds,
and a producer thread that drops files the way real senders do (temp+rename, slow direct writes).

Runs in the pytest process. The mount and sysctl helpers need root, and each one restores what it
changed, also when the test fails.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import os
import random
import signal
import subprocess
import threading
import time
import tomllib
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

from tests.support.data import drop, emr_csv
from tests.support.service import Service

SOAK = os.environ.get("MEDBATCH_SOAK", "") not in ("", "0")


def seed_from_env(default: int | None = None) -> int:
    """`MEDBATCH_SEED` if set (to replay a failure), else a fresh one; always printed."""
    raw = os.environ.get("MEDBATCH_SEED")
    seed = int(raw) if raw else (default if default is not None else random.randrange(1 << 32))
    print(f"seed={seed}")
    return seed


# -- the machine --------------------------------------------------------------------------------


@contextlib.contextmanager
def tmpfs(path: Path, size_bytes: int) -> Iterator[Path]:
    """Mount a tmpfs of `size_bytes` at `path` (created if missing); unmount on the way out."""
    path.mkdir(parents=True, exist_ok=True)
    subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size_bytes},mode=0750", "tmpfs", str(path)],
        check=True,
        capture_output=True,
    )
    try:
        yield path
    finally:
        done = subprocess.run(["umount", str(path)], capture_output=True, check=False)
        if done.returncode != 0:
            # Still busy (a process we failed to stop): detach it so the next test is clean.
            subprocess.run(["umount", "-l", str(path)], capture_output=True, check=False)


def free_bytes(path: Path) -> int:
    st = os.statvfs(path)
    return st.f_bavail * st.f_frsize


@contextlib.contextmanager
def paused_by_full_outbox(service: Service, seed: int, files: int = 4) -> Iterator[Path]:
    """Start `service` with its outbox on a 3 MiB tmpfs filled to the brim and drop `files` EMR
    tables: intake pauses. Yields the ballast (unlink it to give the space back); whatever the
    service left running is killed on the way out."""
    with tmpfs(service.outbox, 3 * 1024 * 1024):
        try:
            service.start()
            ballast = service.outbox / ".ballast"
            fill(ballast)
            rng = random.Random(seed)
            for i in range(files):
                service.drop("emr", f"v{i}.csv", emr_csv(rng, rows=30))
            yield ballast
        finally:
            service.kill_all()


def fill(path: Path, chunk_bytes: int = 64 * 1024) -> int:
    """Write `path` until the filesystem is full (ENOSPC); return the bytes written."""
    written = 0
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        for size in (chunk_bytes, 4096, 512, 1):  # then the last partial pages
            with contextlib.suppress(OSError):
                while True:
                    written += os.write(fd, b"\0" * size)
    finally:
        os.close(fd)
    return written


@contextlib.contextmanager
def sysctl(name: str, value: int | str) -> Iterator[str]:
    """Set a kernel parameter (e.g. `fs.inotify.max_queued_events`); restore the old value."""
    proc = Path("/proc/sys") / name.replace(".", "/")
    old = proc.read_text().strip()
    proc.write_text(f"{value}\n")
    try:
        yield old
    finally:
        proc.write_text(f"{old}\n")


@contextlib.contextmanager
def stopped(pid: int) -> Iterator[None]:
    """SIGSTOP `pid` for the duration of the block; SIGCONT always."""
    os.kill(pid, signal.SIGSTOP)
    try:
        yield
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGCONT)


# -- processes ------------------------------------------------------------------------------------


def _stat_fields(pid: int) -> list[str] | None:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None


def nice_of(pid: int) -> int:
    """The process's nice value (field 19 of /proc/<pid>/stat)."""
    fields = _stat_fields(pid)
    assert fields is not None, f"no process {pid}"
    return int(fields[16])


def session_pids(sid: int) -> list[int]:
    """Live (not zombie) processes of session `sid`: a service started with its own session
    and every worker it spawned, even after the service itself died (orphans)."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        fields = _stat_fields(int(entry.name))
        if fields is not None and fields[0] != "Z" and int(fields[3]) == sid:
            found.append(int(entry.name))
    return sorted(found)


def kill_session(sid: int) -> None:
    for pid in session_pids(sid):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


def cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
    except OSError:
        return ""


def pool_workers(service: Service) -> list[int]:
    """The service's pool workers (forked by its fork server)."""
    return service.worker_pids()


def services_under(basetemp: str) -> list[int]:
    """Service processes whose config lives under `basetemp` (`pgrep -f "daemon --config …"`)."""
    pattern = f"daemon --config {basetemp}"
    return [
        int(e.name)
        for e in Path("/proc").iterdir()
        if e.name.isdigit() and pattern in cmdline(int(e.name))
    ]


class Sessions:
    """Remembers the session of every start of a service, to kill orphans at the end."""

    def __init__(self) -> None:
        self.sids: list[int] = []

    def started(self, service: Service) -> None:
        assert service.process is not None
        self.sids.append(service.process.pid)

    def alive(self) -> list[int]:
        return [pid for sid in self.sids for pid in session_pids(sid)]

    def kill_all(self) -> None:
        for sid in self.sids:
            kill_session(sid)


# -- the service's own records ----------------------------------------------------------------


def events(service: Service, name: str, **match: object) -> list[dict[str, object]]:
    """Audit lines of one event, optionally with given field values."""
    return [
        line
        for line in service.audit()
        if line.get("event") == name and all(line.get(k) == v for k, v in match.items())
    ]


def log_lines(service: Service, run: int | None = None) -> list[dict[str, object]]:
    """Operational log lines (JSON on stderr) of one run of the service (default: every run)."""
    import json

    runs = [run] if run is not None else range(1, service.runs + 1)
    lines = []
    for n in runs:
        path = service.root / f"stderr-{n}.log"
        if not path.exists():
            continue
        for raw in path.read_text(errors="replace").splitlines():
            with contextlib.suppress(ValueError):
                lines.append(json.loads(raw))
    return lines


def stderr_tail(service: Service, lines: int = 30) -> str:
    return "\n".join(service.stderr().splitlines()[-lines:])


# -- content --------------------------------------------------------------------------------------


def png_bytes(rng: random.Random, side: int = 24) -> bytes:
    pixels = np.random.default_rng(rng.randrange(1 << 32)).integers(
        0, 256, (side, side), dtype=np.uint8
    )
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


def genomics_table(rng: random.Random, run: int) -> bytes:
    """A wide table of 30 genes over two samples of its own (a sample measured in two files is
    a duplicate pair, quarantined by default)."""
    rows = [f"G{g},{rng.gauss(50, 12):.6f},{rng.gauss(50, 12):.6f}" for g in range(30)]
    return (f"gene,S{run}a,S{run}b\n" + "\n".join(rows) + "\n").encode()


# A small file of each shipped pipeline: (name, content) of the index-th one.
PIPELINE_FILES: dict[str, Callable[[random.Random, int], tuple[str, bytes]]] = {
    "emr": lambda rng, i: (f"visit-{i:03d}.csv", emr_csv(rng, rows=5)),
    "imaging": lambda rng, i: (f"scan-{i:03d}.png", png_bytes(rng)),
    "genomics": lambda rng, i: (f"run-{i:03d}.csv", genomics_table(rng, i)),
}


def drop_full_batches(config: Path, inbox: Path) -> None:
    """Into each pipeline of `config` (the shipped one), its max_files files: a batch that seals
    at once."""
    for pipeline in tomllib.loads(config.read_text())["pipeline"]:
        make = PIPELINE_FILES[pipeline["name"]]
        rng = random.Random(7)
        for index in range(int(pipeline["max_files"])):
            drop(inbox / pipeline["name"], *make(rng, index))


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def write_slowly(path: Path, content: bytes, pieces: int, pause_s: float) -> str:
    """Write straight into the inbox (no temp name), in `pieces` with pauses, the file held open."""
    cut = max(1, len(content) // pieces)
    with path.open("wb") as fh:
        for start in range(0, len(content), cut):
            fh.write(content[start : start + cut])
            fh.flush()
            if start + cut < len(content):
                time.sleep(pause_s)
    return sha256(content)


@dataclass(frozen=True)
class Drop:
    pipeline: str
    name: str
    content: bytes
    mode: str = "rename"  # "rename" (temp then rename) or "slow" (direct, in pieces)


@dataclass
class Producer:
    """Drops `plan` into `inbox` at `rate_per_s`, on its own threads; `dropped` holds each file
    (name → sha256) once it is whole in the inbox. Slow writes run beside the fast ones."""

    inbox: Path
    plan: list[Drop]
    rate_per_s: float = 50.0
    slow_pieces: int = 4
    slow_pause_s: float = 0.1
    dropped: dict[str, str] = field(default_factory=dict)
    on_drop: Callable[[Drop], None] | None = None

    def __post_init__(self) -> None:
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._errors: list[BaseException] = []
        self._slow: list[threading.Thread] = []
        self._thread = threading.Thread(target=self._run, name="producer", daemon=True)

    def start(self) -> Producer:
        self._thread.start()
        return self

    @property
    def is_done(self) -> bool:
        return not self._thread.is_alive() and not any(t.is_alive() for t in self._slow)

    def stop(self) -> None:
        self._stop.set()

    def close(self) -> None:
        """Stop dropping and wait for the writes under way (after a failure: no leaked thread)."""
        self._stop.set()
        self._thread.join(30)
        for t in self._slow:
            t.join(30)

    def join(self, timeout_s: float = 120) -> dict[str, str]:
        """Wait for every drop (fast and slow) to finish; re-raise a producer error."""
        deadline = time.monotonic() + timeout_s
        self._thread.join(max(0.0, deadline - time.monotonic()))
        for t in self._slow:
            t.join(max(0.0, deadline - time.monotonic()))
        assert self.is_done, "producer did not finish in time"
        if self._errors:
            raise self._errors[0]
        return dict(self.dropped)

    def counts(self) -> Counter[str]:
        return Counter(d.mode for d in self.plan)

    def _run(self) -> None:
        interval = 1.0 / self.rate_per_s
        next_at = time.monotonic()
        for item in self.plan:
            if self._stop.is_set():
                return
            next_at += interval
            try:
                if item.mode == "slow":
                    t = threading.Thread(target=self._slow_drop, args=(item,), daemon=True)
                    self._slow.append(t)
                    t.start()
                else:
                    self._record(item, drop(self.inbox / item.pipeline, item.name, item.content))
            except BaseException as exc:
                self._errors.append(exc)
                return
            delay = next_at - time.monotonic()
            if delay > 0:
                time.sleep(delay)

    def _slow_drop(self, item: Drop) -> None:
        try:
            path = self.inbox / item.pipeline / item.name
            path.parent.mkdir(parents=True, exist_ok=True)
            sha = write_slowly(path, item.content, self.slow_pieces, self.slow_pause_s)
            self._record(item, sha)
        except BaseException as exc:
            self._errors.append(exc)

    def _record(self, item: Drop, sha: str) -> None:
        with self._lock:
            self.dropped[item.name] = sha
        if self.on_drop is not None:
            self.on_drop(item)


def emr_and_images(
    rng: random.Random, n_emr: int, n_images: int, slow_every: int = 25
) -> list[Drop]:
    """A shuffled plan of EMR tables (every `slow_every`-th written slowly, straight into the
    inbox) and PNG images for an `imaging` pipeline."""
    plan = [
        Drop(
            "emr",
            f"visit{i:05d}.csv",
            emr_csv(rng, rows=rng.randint(5, 60), missing_every=rng.choice((0, 0, 7))),
            "slow" if slow_every and i % slow_every == 0 else "rename",
        )
        for i in range(n_emr)
    ]
    plan += [Drop("imaging", f"scan{i:03d}.png", png_bytes(rng), "rename") for i in range(n_images)]
    rng.shuffle(plan)
    return plan


class OutboxReader:
    """A consumer polling the outbox the way a downstream reader would (names not starting with
    '.' or '_'): every folder it sees must be whole (its outputs match its manifest) and must
    never change or vanish afterwards. Problems are collected in `problems`."""

    def __init__(self, outbox: Path, interval_s: float = 0.1) -> None:
        self._outbox = outbox
        self._interval_s = interval_s
        self._seen: dict[Path, str] = {}
        self.problems: list[str] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="outbox-reader", daemon=True)

    def __enter__(self) -> OutboxReader:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(10)
        self.read_once()

    @property
    def folders_seen(self) -> int:
        return len(self._seen)

    def _run(self) -> None:
        while not self._stop.wait(self._interval_s):
            self.read_once()

    def read_once(self) -> None:
        import json

        for folder in list(self._seen):
            if not (folder / "manifest.json").exists():
                self._problem(f"{folder.name}: vanished after it was published")
                del self._seen[folder]
        for folder in self._outbox.glob("*/*"):
            if folder.name.startswith((".", "_")) or not folder.is_dir():
                continue
            try:
                raw = (folder / "manifest.json").read_bytes()
                manifest = json.loads(raw)
                for out in manifest["outputs"]:
                    if sha256((folder / out["name"]).read_bytes()) != out["sha256"]:
                        self._problem(f"{folder.name}/{out['name']}: does not match its manifest")
            except (OSError, ValueError, KeyError) as exc:
                if folder.exists():
                    self._problem(f"{folder.name}: unreadable while visible ({exc!r})")
                continue
            digest = sha256(raw)
            if self._seen.get(folder, digest) != digest:
                self._problem(f"{folder.name}: manifest changed after it was published")
            self._seen[folder] = digest

    def _problem(self, text: str) -> None:
        if text not in self.problems:
            self.problems.append(text)

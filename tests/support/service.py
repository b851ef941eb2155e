"""The real service as a subprocess (`python -m daemon run`) over a temp folder tree."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import sqlite3
import subprocess
import sys
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from daemon.audit import hash_name
from tests.support.data import drop
from tests.support.users import as_user
from tests.support.waiting import wait_until

REPO = Path(__file__).resolve().parents[2]
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


def toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return json.dumps(value)
    if isinstance(value, list | tuple):
        return "[" + ", ".join(toml_value(v) for v in value) + "]"
    return repr(value)


def render_config(
    pipelines: Iterable[Mapping[str, Any]], sections: Mapping[str, Mapping[str, Any]]
) -> str:
    lines = [
        "[paths]",
        'inbox = "inbox"',
        'outbox = "outbox"',
        'state = "state"',
        'quarantine = "quarantine"',
    ]
    for section, values in sections.items():
        lines.append(f"[{section}]")
        lines += [f"{k} = {toml_value(v)}" for k, v in values.items()]
    for pipeline in pipelines:
        lines.append("[[pipeline]]")
        lines += [f"{k} = {toml_value(v)}" for k, v in pipeline.items()]
    return "\n".join(lines) + "\n"


def cpu_s(pid: int) -> float:
    """User + system CPU seconds of one process (all its threads), from /proc/<pid>/stat."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS


def _cmdline(pid: int) -> bytes:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return b""


def _children(pid: int) -> list[int]:
    """Live children of `pid`, whichever of its threads started them."""
    found: list[int] = []
    with contextlib.suppress(OSError):
        for task in Path(f"/proc/{pid}/task").iterdir():
            with contextlib.suppress(OSError):
                found += [int(p) for p in (task / "children").read_text().split()]
    return sorted(found)


class Service:
    def __init__(
        self, root: Path, pipelines: Iterable[Mapping[str, Any]], **sections: Mapping[str, Any]
    ) -> None:
        self.root = root
        self.config = root / "medbatch.toml"
        sections = {"workers": {"count": 2}, "service": {"tick_s": 0.1, "rescan_s": 5}, **sections}
        pipelines = list(pipelines)
        self.config.write_text(render_config(pipelines, sections))
        # Pipelines that publish real names (`hash_names = false`); all others publish hashes.
        self.raw_names = {p["name"] for p in pipelines if p.get("hash_names") is False}
        self.process: subprocess.Popen[bytes] | None = None
        self.runs = 0

    # -- folders --------------------------------------------------------------------------

    @property
    def inbox(self) -> Path:
        return self.root / "inbox"

    @property
    def outbox(self) -> Path:
        return self.root / "outbox"

    @property
    def spool(self) -> Path:
        return self.root / "state" / "spool"

    @property
    def stderr_path(self) -> Path:
        return self.root / f"stderr-{self.runs}.log"

    def drop(self, pipeline: str, name: str, content: bytes) -> str:
        return drop(self.inbox / pipeline, name, content)

    # -- process --------------------------------------------------------------------------

    def command(self, *args: str) -> list[str]:
        return [sys.executable, "-m", "daemon", *args, "--config", str(self.config)]

    def start(
        self,
        *args: str,
        env: Mapping[str, str] | None = None,
        wait_ready: bool = True,
        user: str | None = None,
    ) -> subprocess.Popen[bytes]:
        """Start `run`; as `user` (a non-root service account) when given."""
        self.runs += 1
        stderr = self.stderr_path.open("wb")
        command = self.command("run", *args)
        if user is not None:
            command = as_user(command, user, self.root / ".interpreter")
        self.process = subprocess.Popen(
            command,
            cwd=REPO,
            stdout=subprocess.DEVNULL,
            stderr=stderr,
            env={**os.environ, **(env or {})},
            start_new_session=True,
        )
        stderr.close()
        if wait_ready:
            wait_until(
                lambda: self.is_ready() or self.process.poll() is not None,
                60,
                message="daemon.ready",
            )
            assert self.process.poll() is None, self.stderr()
        return self.process

    def is_ready(self) -> bool:
        return any(line.get("event") == "daemon.ready" for line in self.logs())

    def run(self, *args: str, timeout_s: float = 120) -> subprocess.CompletedProcess[str]:
        """A one-shot command (`run --once`, `status`, `check-config` …)."""
        return subprocess.run(
            self.command(*args),
            cwd=REPO,
            capture_output=True,
            text=True,
            timeout=timeout_s,
            check=False,
        )

    def signal(self, signum: int) -> None:
        assert self.process is not None
        self.process.send_signal(signum)

    def stop(self, timeout_s: float = 60) -> int:
        """SIGTERM and wait for a clean exit."""
        assert self.process is not None
        self.process.send_signal(signal.SIGTERM)
        return self.process.wait(timeout=timeout_s)

    def kill(self) -> None:
        """kill -9 the service (its workers die with their session at teardown, or live on)."""
        assert self.process is not None
        self.process.kill()
        self.process.wait(timeout=10)

    def kill_all(self) -> None:
        """kill -9 the service and every process of its session (the workers)."""
        if self.process is None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.process.pid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.process.wait(timeout=10)

    def worker_pids(self) -> list[int]:
        """The service's pool workers: the children of its fork server."""
        assert self.process is not None
        servers = [p for p in _children(self.process.pid)
                   if b"multiprocessing.forkserver" in _cmdline(p)]  # fmt: skip
        return [worker for server in servers for worker in _children(server)]

    def claimer_pid(self, role: str = "intake.claimer") -> int | None:
        """The service's claimer process (or with role "disposal.mover", the process of its
        archive renames), if it runs one now."""
        assert self.process is not None
        found = [
            p
            for p in _children(self.process.pid)
            if b"daemon.intake.claimer" in (cmd := _cmdline(p))
            and cmd.rstrip(b"\0").endswith(role.encode())
        ]
        return found[0] if found else None

    def stderr(self) -> str:
        return self.stderr_path.read_text(errors="replace") if self.stderr_path.exists() else ""

    def logs(self) -> list[dict[str, Any]]:
        lines = []
        for line in self.stderr().splitlines():
            with contextlib.suppress(ValueError):
                lines.append(json.loads(line))
        return lines

    # -- what it published ----------------------------------------------------------------

    def manifests(self, pipeline: str | None = None) -> list[dict[str, Any]]:
        """Published manifests; input and quarantined names mapped back to the dropped names
        (the published one kept as `published_name`), which fails if one is not a hash."""
        found = []
        for folder in sorted(self.outbox.glob(f"{pipeline or '*'}/*")):
            if folder.name.startswith((".", "_")) or not folder.is_dir():
                continue
            manifest = json.loads((folder / "manifest.json").read_text())
            for part in ("inputs", "quarantined"):
                manifest[part] = [self._named(manifest["pipeline"], i) for i in manifest[part]]
            found.append(manifest)
        return sorted(found, key=lambda m: m["published_at"])

    def published_inputs(self, pipeline: str | None = None) -> list[dict[str, Any]]:
        return [i for m in self.manifests(pipeline) for i in m["inputs"]]

    def quarantined(self, pipeline: str | None = None) -> list[dict[str, Any]]:
        """Sidecars, `name` mapped back to the dropped name (`published_name` as is)."""
        folder = self.root / "quarantine"
        sidecars = [
            json.loads(p.read_text())
            for p in sorted(folder.glob(f"{pipeline or '*'}/*.error.json"))
            if p.is_file()
        ]
        return [self._named(s["pipeline"], s) for s in sidecars]

    def real_name(self, published: str) -> str:
        """The journaled name whose keyed hash is `published` (AssertionError if none is)."""
        names: dict[str, str] = self.__dict__.setdefault("_real_names", {})
        if published not in names:  # a new input since the last look: read the journal again
            key = (self.root / "state" / "audit-name.key").read_bytes()
            names.update((hash_name(key, n), n) for (n,) in self.journal("SELECT name FROM files"))
        assert published in names, f"{published!r} is no hashed name of an input"
        return names[published]

    def _named(self, pipeline: str, item: dict[str, Any]) -> dict[str, Any]:
        # A pipeline that hashes names must never publish a real one: the mapping fails.
        if pipeline in getattr(self, "raw_names", set()):
            # Real names allowed (hash_names = false); a reload may have turned hashing on.
            name = item["name"]
            if name.startswith("hmac-sha256:"):
                with contextlib.suppress(AssertionError):
                    name = self.real_name(name)
            return {**item, "published_name": item["name"], "name": name}
        return {**item, "published_name": item["name"], "name": self.real_name(item["name"])}

    def audit(self) -> list[dict[str, Any]]:
        """Audit lines; a pipeline's `file` mapped back to the dropped name (`published_name`
        as written), which fails if a name-hashing pipeline's line holds a real name."""
        lines = []
        for path in sorted((self.outbox / "_audit").glob("audit-*.jsonl")):
            for line in path.read_text().splitlines():
                with contextlib.suppress(ValueError):
                    lines.append(json.loads(line))
        return [self._audit_named(a) for a in lines]

    def _audit_named(self, line: dict[str, Any]) -> dict[str, Any]:
        if not (isinstance(line.get("file"), str) and isinstance(line.get("pipeline"), str)):
            return line
        name = line["file"]
        if line["pipeline"] not in getattr(self, "raw_names", set()):
            # Refused entries (links, FIFOs) have no files row, and a broken journal none at all:
            # the hash then stays as written.
            assert name.startswith("hmac-sha256:"), f"a real name in an audit line: {line}"
            with contextlib.suppress(AssertionError, sqlite3.Error, OSError):
                name = self.real_name(name)
        return {**line, "file": name, "published_name": line["file"]}

    def journal(self, sql: str, *params: Any) -> list[tuple[Any, ...]]:
        db = sqlite3.connect(f"file:{self.root / 'state' / 'journal.db'}?mode=ro", uri=True)
        try:
            return db.execute(sql, params).fetchall()
        finally:
            db.close()

    def accounted(self) -> int:
        """Files in a terminal state (published, quarantined, duplicate)."""
        if not (self.root / "state" / "journal.db").exists():
            return 0
        return self.journal(
            "SELECT count(*) FROM files WHERE state IN "
            "('published', 'quarantined', 'duplicate') AND disposed=1"
        )[0][0]

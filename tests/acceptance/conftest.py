"""Acceptance tier: the product as it ships, from one fresh clone of the committed HEAD.

One clone and one `make install` (the clone's own Makefile) are shared by the whole tier.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from tests.support.waiting import wait_until

REPO = Path(__file__).resolve().parents[2]
# Settings of the test run that must not reach the product under test.
SCRUBBED = {"VIRTUAL_ENV", "PYTHONPATH", "MEDBATCH_CONFIG", "MEDBATCH_LOG_LEVEL", "NOTIFY_SOCKET"}
SCRUBBED_PREFIXES = ("MAKE", "MFLAGS", "PYTEST_")
BLOCK_RE = re.compile(r"<!-- acceptance: (?P<name>[\w-]+) -->\n```sh\n(?P<body>.*?)\n```", re.S)
MARKED_BLOCKS = ("try-it", "commands")
# README install step 1 uses the distribution's python3; the test run's own interpreter may sit
# under /root, which the unit's non-root user cannot enter.
SYSTEM_PYTHON = "/usr/bin/python3"


def clean_env(**extra: str) -> dict[str, str]:
    """The caller's environment without the test venv and the test run's own settings."""
    env = {
        key: value
        for key, value in os.environ.items()
        if key not in SCRUBBED and not key.startswith(SCRUBBED_PREFIXES)
    }
    path = [p for p in env.get("PATH", "").split(os.pathsep) if not p.startswith(str(REPO))]
    env["PATH"] = os.pathsep.join(path)
    return {**env, **extra}


def readme_blocks(text: str) -> dict[str, str]:
    """The README's shell blocks marked `<!-- acceptance: NAME -->`, by name."""
    return {match["name"]: match["body"] for match in BLOCK_RE.finditer(text)}


@dataclass(frozen=True)
class Clone:
    root: Path
    install_s: float
    install_output: str
    system_install: subprocess.Popen[bytes]
    system_venv: Path

    @property
    def medbatch(self) -> Path:
        return self.root / ".venv" / "bin" / "medbatch"

    def readme_blocks(self) -> dict[str, str]:
        blocks = readme_blocks((self.root / "README.md").read_text())
        missing = [name for name in MARKED_BLOCKS if name not in blocks]
        assert not missing, f"README.md lost its <!-- acceptance: … --> markers: {missing}"
        return blocks

    def batch_folders(self, pipeline: str) -> set[Path]:
        folder = self.root / "outbox" / pipeline
        if not folder.is_dir():
            return set()
        return {p for p in folder.iterdir() if p.is_dir() and not p.name.startswith(".")}


@pytest.fixture(scope="session")
def acceptance_base() -> Iterator[Path]:
    """A world-traversable temp folder: the non-root service user must reach what is in it."""
    base = Path(tempfile.mkdtemp(prefix="medbatch-acceptance-"))
    base.chmod(0o755)
    yield base
    shutil.rmtree(base, ignore_errors=True)


@pytest.fixture(scope="session")
def clone(acceptance_base: Path) -> Iterator[Clone]:
    """`git clone` of the committed HEAD, then its own `make install` (what `make run` does)."""
    root = acceptance_base / "medbatch"
    subprocess.run(["git", "clone", "--quiet", str(REPO), str(root)], check=True, timeout=120)
    head = ["git", "rev-parse", "HEAD"]
    ours = subprocess.run(head, cwd=REPO, capture_output=True, text=True, check=True).stdout
    theirs = subprocess.run(head, cwd=root, capture_output=True, text=True, check=True).stdout
    assert ours == theirs, "the clone is not the committed HEAD"
    # README install step 1 (a venv of its own, `pip install` of the checkout, no -e) for the
    # unit's test, built meanwhile: pip waits on disk and network as much as on the CPU.
    system_venv = acceptance_base / "opt/medbatch/.venv"
    pip = f"{system_venv}/bin/pip install --quiet --quiet {root}"
    system_install = subprocess.Popen(
        ["bash", "-c", f"{SYSTEM_PYTHON} -m venv {system_venv} && {pip}"], env=clean_env()
    )
    started = time.monotonic()
    result = subprocess.run(
        ["make", "install"],
        cwd=root,
        env=clean_env(),
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    install_s = time.monotonic() - started
    try:
        assert result.returncode == 0, result.stdout + result.stderr
        yield Clone(root, install_s, result.stdout + result.stderr, system_install, system_venv)
    finally:
        system_install.wait(timeout=600)


def descendants(pid: int) -> set[int]:
    """Every process below `pid`, from /proc."""
    found: set[int] = set()
    todo = [pid]
    while todo:
        parent = todo.pop()
        with contextlib.suppress(OSError):
            children = Path(f"/proc/{parent}/task/{parent}/children").read_text().split()
            todo += [int(child) for child in children]
            found.update(int(child) for child in children)
    return found


def json_lines(text: str) -> list[dict[str, Any]]:
    lines = []
    for line in text.splitlines():
        with contextlib.suppress(ValueError):
            value = json.loads(line)
            if isinstance(value, dict):
                lines.append(value)
    return lines


class MakeTarget:
    """`make TARGET` in the clone, in its own process group as a terminal would run it."""

    def __init__(self, clone: Clone, target: str, logs: Path) -> None:
        self.clone = clone
        self.output = logs / f"make-{target}.log"
        with self.output.open("wb") as output:
            self.process = subprocess.Popen(
                ["make", target],
                cwd=clone.root,
                env=clean_env(),
                stdin=subprocess.DEVNULL,
                stdout=output,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )

    def text(self) -> str:
        return self.output.read_text(errors="replace")

    def events(self) -> list[str]:
        return [str(line.get("event")) for line in json_lines(self.text())]

    def wait_ready(self, timeout_s: float = 90) -> None:
        wait_until(
            lambda: "daemon.ready" in self.events() or self.process.poll() is not None,
            timeout_s,
            message="daemon.ready from make run",
        )
        assert self.process.poll() is None, self.text()

    def ctrl_c(self, timeout_s: float = 90) -> int:
        """SIGINT to the whole foreground group, as Ctrl-C in a terminal does."""
        os.killpg(self.process.pid, signal.SIGINT)
        return self.process.wait(timeout=timeout_s)

    def kill(self) -> None:
        if self.process.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait(timeout=30)

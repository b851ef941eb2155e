"""The service inside the unit's file-system sandbox: ProtectSystem=strict (the whole OS
read-only), ReadWritePaths= (only its own tree writable) and PrivateTmp=yes, rebuilt with a mount
namespace since PID 1 here is not systemd (`tests/support/readonly_root.sh`). A write anywhere
else fails there (EROFS) as under the unit; a batch of every pipeline must still publish."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.support.faults import PIPELINE_FILES, drop_full_batches
from tests.support.service import REPO

SANDBOX = REPO / "tests" / "support" / "readonly_root.sh"
SHIPPED_CONFIG = REPO / "config" / "medbatch.toml"
PATHS_RE = re.compile(r'^(?P<key>inbox|outbox|state|quarantine) = "[^"]*"', re.M)


@pytest.fixture
def srv() -> Iterator[Path]:
    """The one writable tree, outside /tmp (the sandbox's /tmp is a fresh one)."""
    root = Path(tempfile.mkdtemp(prefix="medbatch-unit-fs-", dir="/var/tmp"))
    try:
        yield root
    finally:
        shutil.rmtree(root, ignore_errors=True)


def sandboxed(command: list[str], srv: Path, **run: Any) -> subprocess.CompletedProcess[str]:
    """`command` in the unit's file-system view: `srv` writable, a checkout under /tmp kept."""
    keep = str(REPO) if str(REPO).startswith("/tmp/") else ""
    return subprocess.run(
        ["unshare", "--mount", "--propagation", "private", "sh", str(SANDBOX), *command],
        capture_output=True, text=True, check=False,
        env={**os.environ, "WRITABLE": str(srv), "KEEP": keep}, **run,
    )  # fmt: skip


def test_every_pipeline_publishes_with_only_its_own_tree_writable(srv: Path) -> None:
    # Given the shipped config pointing at one tree, and a full batch in each pipeline's inbox
    config = srv / "medbatch.toml"
    text = SHIPPED_CONFIG.read_text()
    config.write_text(PATHS_RE.sub(lambda m: f'{m["key"]} = "{srv / m["key"]}"', text))
    drop_full_batches(config, srv / "inbox")
    # When `run --once` runs with the OS read-only, its tree writable and a private /tmp
    command = [sys.executable, "-m", "daemon", "run", "--once", "--config", str(config)]
    done = sandboxed(command, srv, cwd=REPO, timeout=300)
    # Then it exits 0 with every pipeline's batch published
    assert done.returncode == 0, done.stderr[-3000:]
    published = {p.parent.parent.name for p in (srv / "outbox").glob("*/*/manifest.json")}
    assert published == set(PIPELINE_FILES), done.stderr[-3000:]
    assert not any((srv / "quarantine").rglob("*.error.json"))


def test_the_sandbox_refuses_writes_outside_the_tree(srv: Path) -> None:
    """The rebuild itself bites: the tree and /tmp are writable, the checkout and /etc not."""
    probe = (
        f"touch {srv}/ok && touch /tmp/ok && "
        f"! touch {REPO}/nope 2>/dev/null && ! touch /etc/nope 2>/dev/null && echo confined"
    )
    done = sandboxed(["sh", "-c", probe], srv, timeout=60)
    assert done.stdout.strip() == "confined", done.stderr
    assert (srv / "ok").exists() and not (REPO / "nope").exists()

"""Guards on every test: no leaked threads, no leaked child processes."""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest


def _children() -> set[int]:
    me = str(os.getpid())
    found = set()
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if fields[1] == me and fields[0] != "Z" and not _is_multiprocessing_server(entry):
            found.add(int(entry.name))
    return found


def _is_multiprocessing_server(proc: Path) -> bool:
    """multiprocessing's resource tracker and fork server live as long as the interpreter, by
    design (the process executor forks its workers from the fork server)."""
    try:
        cmdline = (proc / "cmdline").read_bytes()
    except OSError:
        return False
    return b"resource_tracker" in cmdline or b"multiprocessing.forkserver" in cmdline


@pytest.fixture(autouse=True)
def no_leaks() -> Iterator[None]:
    threads_before = set(threading.enumerate())
    children_before = _children()
    yield
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        threads = {t for t in threading.enumerate() if t not in threads_before and t.is_alive()}
        children = _children() - children_before
        if not threads and not children:
            return
        time.sleep(0.05)
    assert not threads, f"test leaked threads: {threads}"
    assert not children, f"test leaked child processes: {children}"


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Under pytest-xdist (`--dist loadgroup`), the acceptance tier's tests share one fresh
    clone and venv: they run in one worker."""
    for item in items:
        if "tests/acceptance/" in str(item.path).replace(os.sep, "/"):
            item.add_marker(pytest.mark.xdist_group("acceptance"))

"""What a worker loads before its first task: an imaging worker starts without pandas and
scipy (a third of a second each, paid on every `run --once`), unless it runs under a memory cap,
where everything a processor may load must be in before the cap is set."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

PROBE = """
import json, sys
from daemon.worker import init_worker
init_worker({kinds!r}, {limit!r})
print(json.dumps({{m: m in sys.modules for m in ("pandas", "scipy", "skimage.transform._warps")}}))
"""


def loaded_after_start(kinds: list[str], memory_limit: int | None) -> dict[str, bool]:
    done = subprocess.run(
        [sys.executable, "-c", PROBE.format(kinds=kinds, limit=memory_limit)],
        capture_output=True, text=True, timeout=120, check=True,
    )  # fmt: skip
    loaded: dict[str, bool] = json.loads(done.stdout.splitlines()[-1])
    return loaded


def test_an_imaging_worker_starts_without_pandas_or_scipy() -> None:
    assert loaded_after_start(["imaging"], None) == {
        "pandas": False, "scipy": False, "skimage.transform._warps": False,
    }  # fmt: skip


@pytest.mark.parametrize("kinds", [["imaging"], ["imaging", "emr"]])
def test_under_a_memory_cap_the_optional_modules_load_before_the_cap(kinds: list[str]) -> None:
    loaded = loaded_after_start(kinds, 4 << 30)
    assert loaded["scipy"] and loaded["skimage.transform._warps"]

"""What a worker loads before its first task: an imaging worker starts without pandas and
scipy (a third of a second each, paid on every `run --once`), unless it runs under a memory cap,
where everything a processor may load must be in before the cap is set."""

from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
from pathlib import Path

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


WARM = """
from daemon.worker import init_worker
init_worker({kinds!r})
"""


def start_with_tmpdir(
    kinds: list[str], tmpdir: Path, max_file_bytes: int = resource.RLIM_INFINITY
) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "TMPDIR": str(tmpdir), "MEDBATCH_LOG_LEVEL": "DEBUG"}
    return subprocess.run(
        [sys.executable, "-c", WARM.format(kinds=kinds)],
        capture_output=True, text=True, timeout=120, check=False, env=env,
        preexec_fn=lambda: resource.setrlimit(resource.RLIMIT_FSIZE, (max_file_bytes,) * 2),
    )  # fmt: skip


def test_an_emr_worker_warms_up_in_a_scratch_folder_and_leaves_nothing(tmp_path: Path) -> None:
    started = start_with_tmpdir(["emr"], tmp_path)
    assert started.returncode == 0, started.stderr
    assert '"worker.warmed_up"' in started.stderr and '"emr"' in started.stderr
    assert list(tmp_path.iterdir()) == []  # the scratch folder went with it


def test_a_warm_up_that_cannot_write_costs_the_head_start_not_the_worker(tmp_path: Path) -> None:
    # A worker that may write no byte to a file (Python ignores SIGXFSZ: writes fail, and
    # tempfile then finds no usable folder)
    started = start_with_tmpdir(["emr", "imaging"], tmp_path, max_file_bytes=0)
    assert started.returncode == 0, started.stderr
    assert "worker.warm_up_failed" in started.stderr and "FileNotFoundError" in started.stderr
    assert "worker.warmed_up" not in started.stderr


def test_an_imaging_worker_has_no_warm_up_to_do(tmp_path: Path) -> None:
    started = start_with_tmpdir(["imaging"], tmp_path)
    assert started.returncode == 0, started.stderr
    assert "warm" not in started.stderr  # and (above) it loads neither pandas nor scipy

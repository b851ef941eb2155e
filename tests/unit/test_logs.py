"""Operational logs: one format for structlog and stdlib logging, levels honoured.

Each case runs in a fresh interpreter: logging configuration is process-wide.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[2]

_SCRIPT = r"""
import io, logging, sys
import structlog
from daemon.logs import configure_logging

class Stream(io.StringIO):
    def isatty(self):
        return sys.argv[2] == "tty"

stream = Stream()
configure_logging(sys.argv[1], stream)
log = structlog.get_logger()
log.debug("test.debug", n=1)
log.info("test.info", n=2)
log.warning("test.warning", n=3)
logging.getLogger("apscheduler.scheduler").info("Added job")
logging.getLogger("watchdog.observers").warning("emitter %s died", "inotify")
logging.getLogger("other.lib").info("hello %s", "world")
try:
    1 / 0
except ZeroDivisionError:
    log.exception("test.failed", batch_id="b1")
sys.stdout.write(stream.getvalue())
"""


def run_logging(level: str, *, tty: bool = False) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", _SCRIPT, level, "tty" if tty else "pipe"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        cwd=ROOT,
    )


def json_lines(level: str) -> list[dict[str, Any]]:
    done = run_logging(level)
    assert done.returncode == 0, done.stderr
    return [json.loads(line) for line in done.stdout.splitlines()]


def test_json_lines_with_event_level_and_time() -> None:
    """Not a terminal: every line is JSON with timestamp, level and event, stdlib ones too."""
    lines = json_lines("info")
    assert all({"timestamp", "level", "event"} <= line.keys() for line in lines)
    assert all(line["timestamp"].endswith("Z") for line in lines)
    by_event = {line["event"]: line for line in lines}
    assert by_event["test.info"]["n"] == 2
    assert by_event["test.warning"]["level"] == "warning"
    assert by_event["emitter inotify died"] == {
        **by_event["emitter inotify died"],
        "level": "warning",
        "logger": "watchdog.observers",
    }
    assert by_event["hello world"]["logger"] == "other.lib"
    failed = by_event["test.failed"]
    assert failed["level"] == "error" and failed["batch_id"] == "b1"
    assert "ZeroDivisionError" in failed["exception"]


def test_libraries_log_at_warning_and_up_only() -> None:
    """apscheduler's INFO chatter (one line per job run) is not shown; its warnings are."""
    events = [line["event"] for line in json_lines("debug")]
    assert "Added job" not in events
    assert "emitter inotify died" in events
    assert "test.debug" in events


@pytest.mark.parametrize(
    ("level", "expected"),
    [
        ("warning", ["test.warning", "emitter inotify died", "test.failed"]),
        ("ERROR", ["test.failed"]),
        ("info", ["test.info", "test.warning", "emitter inotify died", "hello world"]),
    ],
)
def test_level_is_honoured(level: str, expected: list[str]) -> None:
    """Lines below the level are dropped, for structlog and stdlib alike (any case)."""
    events = [line["event"] for line in json_lines(level)]
    assert events[: len(expected)] == expected
    assert "test.debug" not in events


def test_terminal_gets_key_value_lines() -> None:
    """On a terminal the lines are readable text with key=value facts, not JSON."""
    done = run_logging("info", tty=True)
    assert done.returncode == 0, done.stderr
    plain = re.sub(r"\x1b\[[0-9;]*m", "", done.stdout)
    info = next(line for line in plain.splitlines() if "test.info" in line)
    assert not info.lstrip().startswith("{")
    assert "[info     ] test.info" in info and info.rstrip().endswith("n=2")
    assert "ZeroDivisionError" in done.stdout
    assert not done.stderr  # no warning about format_exc_info and pretty exceptions


def test_unknown_level_is_a_config_error() -> None:
    """A bad level (from $MEDBATCH_LOG_LEVEL) exits 78 naming it; on the command line, 2."""
    done = run_logging("loud")
    assert done.returncode == 1 and "log_level: 'loud' is not one of" in done.stderr
    env_run = subprocess.run(
        [sys.executable, "-m", "daemon", "check-config", "config/medbatch.toml"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        cwd=ROOT,
        env={"MEDBATCH_LOG_LEVEL": "loud", "PATH": "/usr/bin:/bin"},
    )
    assert env_run.returncode == 78, env_run.stderr
    assert "log_level" in env_run.stderr
    arg_run = subprocess.run(
        [sys.executable, "-m", "daemon", "--log-level", "loud", "check-config"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        cwd=ROOT,
    )
    assert arg_run.returncode == 2 and "--log-level" in arg_run.stderr

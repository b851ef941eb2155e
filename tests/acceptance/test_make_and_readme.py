"""`make install`, `make run`, `make once` and the README's shell blocks, as written, in a clone."""

from __future__ import annotations

import csv
import hashlib
import json
import re
import signal
import subprocess
from pathlib import Path

from tests.acceptance.conftest import REPO, Clone, MakeTarget, clean_env, readme_blocks
from tests.support.waiting import wait_until

EXPECTED_EXIT_RE = re.compile(r"#\s*exit (?P<status>\d+)\b")
EX_TEMPFAIL = 75
EX_CONFIG = 78
DEV_ONLY = ("pytest", "ruff", "mypy", "medbatch-example-processor")


def bash(script: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["bash", "-c", script],
        cwd=cwd,
        env=clean_env(),
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def command_lines(block: str) -> tuple[str, list[tuple[str, int]]]:
    """The block's set-up lines, and each command with the exit status its comment promises."""
    setup = [line for line in block.splitlines() if not EXPECTED_EXIT_RE.search(line)]
    commands = [
        (line, int(match["status"]))
        for line in block.splitlines()
        if (match := EXPECTED_EXIT_RE.search(line))
    ]
    return "\n".join(setup), commands


def test_readme_marks_the_blocks_this_tier_runs() -> None:
    """The README's Try-it and command blocks carry their acceptance markers."""
    blocks = readme_blocks((REPO / "README.md").read_text())
    assert {"try-it", "commands"} <= set(blocks)
    _, commands = command_lines(blocks["commands"])
    assert len(commands) >= 5


def test_make_install_is_the_service_only(clone: Clone, tmp_path: Path) -> None:
    """`make install` (what `make run` runs) brings no dev tool and no test plug-in, quietly."""
    assert "warning" not in clone.install_output.lower(), clone.install_output
    assert "deprecat" not in clone.install_output.lower(), clone.install_output
    names = subprocess.run(
        [
            str(clone.root / ".venv/bin/python"),
            "-c",
            "import importlib.metadata as m; print(*(d.name for d in m.distributions()))",
        ],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.lower()
    assert "medbatch" in names.split()
    assert [name for name in DEV_ONLY if name in names.split()] == []
    # A config asking for the test plug-in's kind is refused, and `faulty` is not a known kind.
    config = tmp_path / "faulty.toml"
    text = (clone.root / "config/medbatch.toml").read_text()
    config.write_text(text.replace('kind = "genomics"', 'kind = "faulty"'))
    result = subprocess.run(
        [str(clone.medbatch), "check-config", str(config)],
        capture_output=True,
        text=True,
        env=clean_env(),
        check=False,
    )
    assert result.returncode == EX_CONFIG, result.stdout + result.stderr
    assert "'faulty'" in result.stderr
    assert "faulty," not in result.stderr and "faulty)" not in result.stderr


def test_make_run_then_the_readme_blocks_then_ctrl_c(clone: Clone, tmp_path: Path) -> None:
    """`make run` reaches ready; the Try-it block publishes numbers; each command of the README
    exits as promised (a second instance 75, naming the holder); Ctrl-C stops it cleanly."""
    blocks = clone.readme_blocks()
    before = clone.batch_folders("emr")
    service = MakeTarget(clone, "run", tmp_path)
    try:
        service.wait_ready()
        # When the Try-it block runs as written (its /tmp/ scratch file moved to a temp folder)
        tried = bash(blocks["try-it"].replace("/tmp/", f"{tmp_path}/"), clone.root)
        assert tried.returncode == 0, tried.stderr
        # Then within max_wait (30 s for emr) a batch with real numbers is published
        folder = wait_until(
            lambda: next(iter(clone.batch_folders("emr") - before), None), 90, message="batch"
        )
        with (folder / "result.csv").open(newline="") as result:
            rows = list(csv.DictReader(result))
        assert [(row["diagnosis"], row["n"]) for row in rows] == [("asthma", "20"), ("copd", "20")]
        assert all(row["mean_age"] and row["mean_systolic_bp"] for row in rows), rows
        # And every command of the command block exits with the status the README promises
        setup, commands = command_lines(blocks["commands"])
        holders = {str(pid) for pid in service_pids(service)}
        for line, expected in commands:
            result = bash(f"{setup}\n{line}", clone.root)
            assert (line, result.returncode) == (line, expected), result.stdout + result.stderr
            if expected == EX_TEMPFAIL:
                assert set(re.findall(r"\d+", result.stderr)) & holders, result.stderr
    finally:
        status = service.ctrl_c() if service.process.poll() is None else service.process.returncode
        service.kill()
    # Then Ctrl-C drained and stopped the service: make ends by the same SIGINT, no error
    assert status in (0, -signal.SIGINT), service.text()
    assert "daemon.stopped" in service.events(), service.text()
    assert "Error" not in service.text()


def service_pids(service: MakeTarget) -> set[int]:
    from tests.acceptance.conftest import descendants

    return descendants(service.process.pid) | {service.process.pid}


def test_make_once_publishes_what_is_in_the_inbox(clone: Clone, tmp_path: Path) -> None:
    """`make once` as written takes the file in the inbox, publishes it and exits 0."""
    rows = [f"{200000 + i},{'flu' if i % 2 else 'gout'},{40 + i},{120 + i}" for i in range(30)]
    content = ("patient_id,diagnosis,age,systolic_bp\n" + "\n".join(rows) + "\n").encode()
    inbox = clone.root / "inbox" / "emr"
    (inbox / ".once.csv.part").write_bytes(content)
    (inbox / ".once.csv.part").rename(inbox / "once.csv")
    result = subprocess.run(
        ["make", "once"],
        cwd=clone.root,
        env=clean_env(),
        capture_output=True,
        text=True,
        timeout=180,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert not (inbox / "once.csv").exists()
    digest = hashlib.sha256(content).hexdigest()
    published = [
        entry["sha256"]
        for folder in clone.batch_folders("emr")
        for entry in json.loads((folder / "manifest.json").read_text())["inputs"]
    ]
    assert digest in published

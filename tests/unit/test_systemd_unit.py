"""The shipped systemd unit, sysusers.d and tmpfiles.d files: systemd's own tools accept them."""

from __future__ import annotations

import os
import re
import shlex
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import pytest

SYSTEMD_DIR = Path(__file__).resolve().parents[2] / "systemd"
UNIT = SYSTEMD_DIR / "medbatch.service"
SYSUSERS = SYSTEMD_DIR / "medbatch.sysusers.conf"
TMPFILES = SYSTEMD_DIR / "medbatch.tmpfiles.conf"
SHIPPED_EXEC = "/opt/medbatch/.venv/bin/medbatch"
MAX_EXPOSURE = 1.5
GRACEFUL_TIMEOUT_DEFAULT_S = 60  # the config's graceful_timeout_s default
EXPOSURE_RE = re.compile(r"Overall exposure level for (?P<unit>\S+): (?P<level>\d+(?:\.\d+)?)")

# CI installs systemd-analyze (.ci/run) and must never leave the unit unchecked: there a
# missing tool fails the test; a developer's machine without it skips, saying why.
needs_analyze = pytest.mark.skipif(
    shutil.which("systemd-analyze") is None and not os.environ.get("CI"),
    reason="systemd-analyze not installed",
)


def run(*args: str | Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "SYSTEMD_COLORS": "0", "SYSTEMD_PAGER": "", "LC_ALL": "C.UTF-8"}
    return subprocess.run(
        [str(arg) for arg in args],
        capture_output=True,
        text=True,
        encoding="utf-8",
        errors="replace",
        env=env,
        timeout=120,
        check=False,
    )


def directives(text: str) -> dict[str, list[str]]:
    """'Section.Key' -> values in order (a key may repeat, e.g. SystemCallFilter=)."""
    found: dict[str, list[str]] = {}
    section = ""
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("["):
            section = line.strip("[]")
            continue
        key, _, value = line.partition("=")
        found.setdefault(f"{section}.{key.strip()}", []).append(value.strip())
    return found


def config_lines(path: Path) -> list[list[str]]:
    return [
        shlex.split(line)
        for line in path.read_text().splitlines()
        if line.strip() and not line.lstrip().startswith("#")
    ]


@pytest.fixture
def unit_copy(tmp_path: Path) -> Path:
    """The unit with ExecStart pointing at an executable that exists here (verify checks it)."""
    script = Path(sys.executable).parent / "medbatch"
    executable = script if os.access(script, os.X_OK) else Path(sys.executable)
    text = UNIT.read_text()
    assert f"ExecStart={SHIPPED_EXEC} " in text
    copy = tmp_path / UNIT.name
    copy.write_text(text.replace(f"ExecStart={SHIPPED_EXEC} ", f"ExecStart={executable} "))
    return copy


@needs_analyze
def test_unit_verifies_clean(unit_copy: Path) -> None:
    """systemd-analyze verify reports no error or warning for our unit."""
    result = run(
        "systemd-analyze",
        "verify",
        "--man=no",
        "--generators=no",
        "--recursive-errors=no",
        unit_copy,
    )
    output = result.stdout + result.stderr
    ours = [line for line in output.splitlines() if unit_copy.name in line]
    assert result.returncode == 0, output
    assert ours == []


@needs_analyze
def test_unit_exposure_is_low(unit_copy: Path) -> None:
    """systemd-analyze security rates the unit's exposure at most 1.5 (of 10)."""
    result = run("systemd-analyze", "security", "--offline=yes", "--no-pager", unit_copy)
    assert result.returncode == 0, result.stderr
    match = EXPOSURE_RE.search(result.stdout)
    assert match is not None, result.stdout
    assert match["unit"] == UNIT.name
    assert float(match["level"]) <= MAX_EXPOSURE, result.stdout


def test_unit_has_the_lifecycle_directives() -> None:
    """The settings the daemon's lifecycle relies on are present with the agreed values."""
    found = directives(UNIT.read_text())
    expected = {
        "Service.Type": "notify",
        "Service.NotifyAccess": "main",
        "Service.ExecStart": f"{SHIPPED_EXEC} run --config /etc/medbatch/medbatch.toml",
        "Service.ExecReload": "/bin/kill -HUP $MAINPID",
        "Service.KillMode": "mixed",
        "Service.OOMPolicy": "continue",
        "Service.RestartPreventExitStatus": "78 65 75",
        "Service.MemoryHigh": "70%",
        "Service.MemoryMax": "80%",
        "Service.MemorySwapMax": "0",
        "Service.Restart": "on-failure",
        "Service.WatchdogSec": "30",
        "Service.User": "medbatch",
        "Service.Group": "medbatch",
        "Install.WantedBy": "multi-user.target",
    }
    assert {key: found.get(key, [""])[-1] for key in expected} == expected
    assert int(found["Service.TimeoutStopSec"][-1]) > GRACEFUL_TIMEOUT_DEFAULT_S


def test_writable_paths_come_from_tmpfiles_and_user_from_sysusers() -> None:
    """Every ReadWritePaths= folder is created by tmpfiles.d; User= is created by sysusers.d."""
    found = directives(UNIT.read_text())
    writable = found["Service.ReadWritePaths"][-1].split()
    created = {fields[1] for fields in config_lines(TMPFILES) if fields[0] == "d"}
    assert set(writable) <= created
    users = {fields[1] for fields in config_lines(SYSUSERS) if fields[0] == "u"}
    assert found["Service.User"][-1] in users


def test_config_lines_are_well_formed() -> None:
    """Each sysusers/tmpfiles line has the right field count, type and an octal mode."""
    for fields in config_lines(SYSUSERS):
        assert fields[0] in {"u", "g", "m", "r"}, fields
        assert len(fields) == 6, fields
    for fields in config_lines(TMPFILES):
        assert fields[0] in {"d", "D", "e", "z", "Z", "a", "a+", "f", "L"}, fields
        assert len(fields) in {5, 6}, fields
        assert fields[1].startswith("/"), fields
        assert re.fullmatch(r"[0-7]{4}|-", fields[2]), fields


@pytest.mark.skipif(shutil.which("systemd-sysusers") is None, reason="systemd-sysusers missing")
def test_sysusers_conf_is_accepted(tmp_path: Path) -> None:
    """systemd-sysusers --dry-run on an empty root would create the user and group medbatch."""
    result = run("systemd-sysusers", f"--root={tmp_path}", "--dry-run", SYSUSERS)
    assert result.returncode == 0, result.stderr
    assert SYSUSERS.name not in result.stderr  # parse errors are "<file>:<line>: …"
    assert "Creating user 'medbatch'" in result.stderr


@pytest.mark.skipif(
    shutil.which("systemd-sysusers") is None or shutil.which("systemd-tmpfiles") is None,
    reason="systemd-sysusers or systemd-tmpfiles missing",
)
@pytest.mark.skipif(os.geteuid() != 0, reason="systemd-tmpfiles must be root to chown")
def test_tmpfiles_conf_creates_the_folders(tmp_path: Path) -> None:
    """In a scratch root, sysusers then tmpfiles create the folders with the modes we promise."""
    # Given a scratch root with the medbatch user (tmpfiles resolves names in the root's passwd)
    (tmp_path / "etc").mkdir()
    assert run("systemd-sysusers", f"--root={tmp_path}", SYSUSERS).returncode == 0
    groups = dict(line.split(":", 1) for line in (tmp_path / "etc/group").read_text().splitlines())
    gid = int(groups["medbatch"].split(":")[1])
    # When tmpfiles creates the folders
    result = run("systemd-tmpfiles", f"--root={tmp_path}", "--create", TMPFILES)
    # Then they exist, group medbatch, with these modes
    assert result.returncode == 0, result.stderr
    assert result.stderr == ""
    expected_modes = {
        "etc/medbatch": 0o750,
        "srv/medbatch/state": 0o700,
        "srv/medbatch": 0o750,
        "srv/medbatch/inbox": 0o3770,
        "srv/medbatch/inbox/emr": 0o3770,
        "srv/medbatch/inbox/imaging": 0o3770,
        "srv/medbatch/inbox/genomics": 0o3770,
        "srv/medbatch/outbox": 0o750,
        "srv/medbatch/quarantine": 0o750,
    }
    for relative, mode in expected_modes.items():
        info = (tmp_path / relative).stat()
        assert stat.S_ISDIR(info.st_mode), relative
        assert (relative, stat.S_IMODE(info.st_mode)) == (relative, mode)
        assert (relative, info.st_gid) == (relative, gid)

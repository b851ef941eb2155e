"""The command line as documented: options anywhere, the default config chain, the instance
lock, pre-flight checks and escaped output."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from daemon import preflight
from daemon.cli.main import parser
from daemon.cli.output import printable
from daemon.config import SYSTEM_CONFIG, Settings, config_path_from, load_settings
from daemon.errors import ConfigError, InstanceLockedError
from daemon.instance_lock import InstanceLock


@pytest.mark.parametrize(
    "argv",
    [
        ["--config", "X", "run"],
        ["run", "--config", "X"],
        ["run", "--once", "--config", "X"],
        ["--config", "X", "audit", "verify"],
        ["audit", "--config", "X", "verify"],
        ["audit", "verify", "--config", "X"],
        ["status", "--json", "--config", "X"],
        ["trace", "--config", "X", "abc"],
        ["trace", "abc", "--config=X"],
    ],
)
def test_config_is_accepted_before_or_after_any_subcommand(argv: list[str]) -> None:
    """`--config` parses wherever the README, Makefile or unit puts it."""
    assert parser().parse_args(argv).config == "X"


def test_log_level_after_the_subcommand_and_not_reset_by_it() -> None:
    """An option given before the subcommand survives the subcommand's parse."""
    assert parser().parse_args(["run", "--log-level", "debug"]).log_level == "DEBUG"
    args = parser().parse_args(["--log-level", "warning", "--config", "A", "status"])
    assert (args.log_level, args.config) == ("WARNING", "A")


def test_no_config_anywhere_names_all_three_places(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """With no --config, no $MEDBATCH_CONFIG and no default file, the error names all three."""
    if SYSTEM_CONFIG.exists():
        pytest.fail(f"{SYSTEM_CONFIG} exists on this machine; the test needs it absent")
    monkeypatch.delenv("MEDBATCH_CONFIG", raising=False)
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ConfigError) as caught:
        config_path_from(None)
    for place in ("--config", "$MEDBATCH_CONFIG", "config/medbatch.toml", str(SYSTEM_CONFIG)):
        assert place in str(caught.value)


def test_a_second_lock_is_refused_naming_the_holder(tmp_path: Path) -> None:
    """The lock file names the holder's pid; a second holder is refused until release."""
    with InstanceLock(tmp_path / "state"):
        with pytest.raises(InstanceLockedError) as caught:
            InstanceLock(tmp_path / "state").acquire()
        assert caught.value.pid == os.getpid()
        assert f"pid {os.getpid()}" in str(caught.value)
    with InstanceLock(tmp_path / "state"):
        pass  # released: taken again


def test_a_killed_holder_leaves_no_stale_lock(tmp_path: Path) -> None:
    """The kernel drops the flock with its process: kill -9 never leaves the folder locked."""
    code = (
        "import sys, os; sys.path.insert(0, {!r}); from daemon.instance_lock import InstanceLock;"
        "InstanceLock(__import__('pathlib').Path({!r})).acquire(); os.kill(os.getpid(), 9)"
    ).format(str(Path(__file__).resolve().parents[2]), str(tmp_path / "state"))
    done = subprocess.run([sys.executable, "-c", code], check=False)
    assert done.returncode == -9
    with InstanceLock(tmp_path / "state"):
        pass


def _settings(tmp_path: Path, extra: str = "") -> Settings:
    config = tmp_path / "medbatch.toml"
    config.write_text(
        '[paths]\ninbox = "in"\noutbox = "out"\nstate = "st"\nquarantine = "q"\n'
        + extra
        + '[[pipeline]]\nname = "emr"\nkind = "emr"\n'
    )
    return load_settings(config)


def test_preflight_names_a_folder_that_is_a_file(tmp_path: Path) -> None:
    """A path that is a file, or a symlink, is named by its key before anything starts."""
    (tmp_path / "out").write_text("not a folder")
    (tmp_path / "real-q").mkdir()
    (tmp_path / "q").symlink_to(tmp_path / "real-q")
    found = {e.key for e in preflight.problems(_settings(tmp_path), bind=False)}
    assert found == {"paths.outbox", "paths.quarantine"}


def test_preflight_refuses_state_on_another_filesystem(tmp_path: Path) -> None:
    """Claiming is a rename: the state folder must share the inbox's filesystem."""
    shm = Path("/dev/shm")
    if os.stat(shm).st_dev == os.stat(tmp_path).st_dev:
        pytest.fail("/dev/shm and the temp folder share a filesystem here")
    state = shm / f"medbatch-test-{os.getpid()}"
    base = _settings(tmp_path)
    settings = base.model_copy(update={"paths": base.paths.model_copy(update={"state": state})})
    with pytest.raises(ConfigError, match="same filesystem") as caught:
        preflight.check(settings, bind=False)
    assert caught.value.key == "paths.state"


def test_preflight_names_a_metrics_port_in_use(tmp_path: Path) -> None:
    """A taken port fails before start-up, naming service.metrics_address."""
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        settings = _settings(tmp_path, f'[service]\nmetrics_address = "127.0.0.1:{port}"\n')
        with pytest.raises(ConfigError) as caught:
            preflight.check(settings, bind=True)
    assert caught.value.key == "service.metrics_address"
    assert "EADDRINUSE" in str(caught.value)


@pytest.mark.parametrize(
    "address", ["nonsense", "127.0.0.1", "127.0.0.1:99999", "example.org:9464", "[zz]:1", ""]
)
def test_a_bad_metrics_address_fails_when_the_config_loads(tmp_path: Path, address: str) -> None:
    """check-config catches a bad address, not the running service after start-up."""
    with pytest.raises(ConfigError) as caught:
        _settings(tmp_path, f'[service]\nmetrics_address = "{address}"\n')
    assert caught.value.key == "service.metrics_address"


@pytest.mark.parametrize(
    ("text", "shown"),
    [
        ("plain name.csv", "plain name.csv"),
        ("évé.csv", "évé.csv"),
        ("a\x1b[2Jb", "a\\x1b[2Jb"),
        ("line\nforged", "line\\nforged"),
        ("cr\rx", "cr\\rx"),
        ("rtl\u202egnp.exe", "rtl\\u202egnp.exe"),
        ("zero\u200bwidth", "zero\\u200bwidth"),
        ("tab\tx", "tab\\tx"),
        ("sep\u2028x", "sep\\u2028x"),
    ],
)
def test_control_characters_are_escaped_for_the_terminal(text: str, shown: str) -> None:
    """No name can move the cursor, clear the screen, reverse text or forge a line."""
    assert printable(text) == shown

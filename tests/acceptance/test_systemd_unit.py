"""The unit's ExecStart=/ExecReload= run as written, as a non-root user, speaking sd_notify.

PID 1 of the development and CI machines is not systemd (a microVM's own init), so instead of
the unit the command lines run verbatim, with the unit's User=, UMask=, Environment= and its
system call sandbox (SystemCallFilter=, SystemCallErrorNumber=, MemoryDenyWriteExecute=).
"""

from __future__ import annotations

import contextlib
import grp
import os
import pwd
import re
import shlex
import signal
import socket
import stat
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.acceptance.conftest import REPO, Clone
from tests.support.faults import PIPELINE_FILES, drop_full_batches
from tests.support.seccomp import UnitSandbox
from tests.support.waiting import wait_until

UNIT = REPO / "systemd" / "medbatch.service"
READONLY_ROOT = REPO / "tests" / "support" / "readonly_root.sh"
SHIPPED_VENV = "/opt/medbatch/.venv"
SHIPPED_CONFIG = "/etc/medbatch/medbatch.toml"
PATHS_RE = re.compile(r'^(?P<key>inbox|outbox|state|quarantine) = "[^"]*"', re.M)
FOLDER_MODES = {
    "state": 0o700,
    "inbox": 0o3770,
    "inbox/emr": 0o3770,
    "inbox/imaging": 0o3770,
    "inbox/genomics": 0o3770,
    "outbox": 0o750,
    "quarantine": 0o750,
}


def unit_directives() -> dict[str, list[str]]:
    found: dict[str, list[str]] = {}
    for raw in UNIT.read_text().splitlines():
        line = raw.strip()
        if line and not line.startswith(("#", ";", "[")):
            key, _, value = line.partition("=")
            found.setdefault(key.strip(), []).append(value.strip())
    return found


@dataclass(frozen=True)
class Account:
    name: str
    uid: int
    gid: int
    home: str


@pytest.fixture(scope="session")
def service_account() -> Iterator[Account]:
    """A system user and group of its own, created for the tier and removed after it."""
    name = f"mbacc{os.getpid() % 100000}"
    subprocess.run(
        [
            "useradd",
            "--system",
            "--user-group",
            "--no-create-home",
            "--shell",
            "/usr/sbin/nologin",
            name,
        ],
        check=True,
    )
    entry = pwd.getpwnam(name)
    try:
        yield Account(name, entry.pw_uid, entry.pw_gid, entry.pw_dir)
    finally:
        subprocess.run(["userdel", name], check=False)
        with contextlib.suppress(KeyError):
            grp.getgrnam(name)
            subprocess.run(["groupdel", name], check=False)


@pytest.fixture(scope="session")
def installed(clone: Clone) -> Path:
    """README install step 1: a venv of its own and `pip install` of the checkout (no -e)."""
    assert clone.system_install.wait(timeout=600) == 0
    return clone.system_venv


def layout(root: Path, clone: Clone, account: Account) -> Path:
    """The tmpfiles.d folders and the config of the install steps, under `root`."""
    srv = root / "srv/medbatch"
    srv.mkdir(parents=True)
    for relative, mode in FOLDER_MODES.items():
        folder = srv / relative
        folder.mkdir(parents=True, exist_ok=True)
        os.chown(folder, account.uid, account.gid)
        folder.chmod(mode)
    etc = root / "etc/medbatch"
    etc.mkdir(parents=True)
    os.chown(etc, 0, account.gid)
    etc.chmod(0o750)
    config = etc / "medbatch.toml"
    text = (clone.root / "config/medbatch.toml").read_text()
    config.write_text(PATHS_RE.sub(lambda m: f'{m["key"]} = "{srv / m["key"]}"', text))
    os.chown(config, 0, account.gid)
    config.chmod(0o640)
    for folder in (root, root / "srv", root / "etc"):
        folder.chmod(0o755)
    return config


class NotifySocket:
    """The datagram socket systemd would listen on."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(str(path))
        path.chmod(0o666)
        self.sock.settimeout(0.2)
        self.messages: list[str] = []

    def receive(self) -> list[str]:
        with contextlib.suppress(TimeoutError, BlockingIOError):
            self.messages += self.sock.recv(4096).decode().splitlines()
        return self.messages

    def wait_for(self, message: str, after: int, timeout_s: float = 90) -> int:
        """The index of `message` among those received from index `after` on."""
        wait_until(lambda: message in self.receive()[after:], timeout_s, message=message)
        return self.messages.index(message, after)


def as_written(directive: str, venv: Path, config: Path, mainpid: int = 0) -> list[str]:
    line = unit_directives()[directive][-1]
    line = line.replace(SHIPPED_VENV, str(venv)).replace(SHIPPED_CONFIG, str(config))
    return shlex.split(line.replace("$MAINPID", str(mainpid)))


def test_unit_command_lines_as_a_non_root_user(
    clone: Clone, installed: Path, service_account: Account, acceptance_base: Path
) -> None:
    """ExecStart= as written, as User=, in the unit's system call sandbox, reaches READY=1 and
    publishes a dropped batch (its workers run in the sandbox too); ExecReload= gives
    RELOADING=1 then READY=1; SIGTERM (systemctl stop) exits 0; files it writes follow UMask=."""
    # Given the unit's user, umask, environment and system call filter, and the folders of the
    # install steps
    directives = unit_directives()
    sandbox = UnitSandbox.of_unit(directives)
    assert directives["User"][-1] == "medbatch" and directives["Group"][-1] == "medbatch"
    umask = int(directives["UMask"][-1], 8)
    environment = dict(
        item.split("=", 1) for value in directives["Environment"] for item in shlex.split(value)
    )
    root = acceptance_base / "unit"  # pytest's tmp_path is root's alone (0700)
    root.mkdir()
    config = layout(root, clone, service_account)
    notify = NotifySocket(root / "notify.sock")
    user = {
        "user": service_account.uid,
        "group": service_account.gid,
        "extra_groups": [],
        "umask": umask,
        "cwd": "/",
        "preexec_fn": sandbox.load,  # ExecReload= runs in the unit's filter too
    }
    env = {
        "PATH": "/usr/local/bin:/usr/bin:/bin",
        "LANG": "C.UTF-8",
        "USER": service_account.name,
        "LOGNAME": service_account.name,
        "HOME": service_account.home,
        "NOTIFY_SOCKET": str(notify.path),
        **environment,
    }
    # The unit's file-system view (ProtectSystem=strict, ReadWritePaths=, PrivateTmp=) is set up
    # as root; then, as systemd does, the user, the umask and last the system call filter.
    program = root / "filter.bpf"
    sandbox.export(program)
    command = [
        "unshare", "--mount", "--propagation", "private", "sh", str(READONLY_ROOT),
        "setpriv", f"--reuid={service_account.uid}", f"--regid={service_account.gid}",
        "--clear-groups", "--",
        *sandbox.launcher(program, umask, as_written("ExecStart", installed, config)),
    ]  # fmt: skip
    mounts = {"WRITABLE": str(root / "srv/medbatch"), "KEEP": str(acceptance_base)}
    stderr = (root / "stderr.log").open("wb")
    # When systemd would start it
    service = subprocess.Popen(
        command,
        env={**env, **mounts},
        cwd="/",
        stdout=subprocess.DEVNULL,
        stderr=stderr,
        start_new_session=True,
    )
    stderr.close()
    try:
        # Then it says READY=1 as the service user
        ready = notify.wait_for("READY=1", 0)
        assert service.poll() is None
        assert Path(f"/proc/{service.pid}").stat().st_uid == service_account.uid
        # And it runs in its own mount namespace, with no_new_privs and a seccomp filter
        status = Path(f"/proc/{service.pid}/status").read_text()
        assert "\nSeccomp:\t2\n" in status and "\nNoNewPrivs:\t1\n" in status
        assert os.readlink(f"/proc/{service.pid}/ns/mnt") != os.readlink("/proc/self/ns/mnt")
        # When producers drop a full batch (the shipped config's max_files) into each pipeline
        srv = root / "srv/medbatch"
        drop_full_batches(config, srv / "inbox")
        # Then the workers, in the same sandbox, publish each: every processor's libraries
        # (pyarrow, scikit-image, Pillow, pandas) run under the filter
        for pipeline in PIPELINE_FILES:
            wait_until(
                lambda pipeline=pipeline: any((srv / "outbox" / pipeline).glob("*/manifest.json")),
                90,
                message=f"no {pipeline} batch published; stderr: "
                f"{(root / 'stderr.log').read_text()[-3000:]}",
            )
        assert not any((srv / "quarantine").rglob("*.error.json")), "a sample file refused"
        # When systemctl reload runs ExecReload= (as the same user)
        reload = subprocess.run(
            as_written("ExecReload", installed, config, mainpid=service.pid),
            env=env,
            check=False,
            timeout=30,
            **user,  # type: ignore[call-overload]
        )
        assert reload.returncode == 0
        # Then RELOADING=1, then READY=1 again
        reloading = notify.wait_for("RELOADING=1", ready + 1)
        notify.wait_for("READY=1", reloading + 1)
        # And what it wrote is the user's, with no access for others (UMask=)
        audit = sorted((root / "srv/medbatch/outbox/_audit").glob("audit-*.jsonl"))
        assert audit
        info = audit[0].stat()
        assert info.st_uid == service_account.uid
        assert stat.S_IMODE(info.st_mode) & 0o007 == 0
        # When systemctl stop sends SIGTERM to the main process (KillMode=mixed)
        service.send_signal(signal.SIGTERM)
        # Then it drains and exits 0
        assert service.wait(timeout=90) == 0, (root / "stderr.log").read_text()
        assert "STOPPING=1" in notify.receive()
    finally:
        if service.poll() is None:
            os.killpg(service.pid, signal.SIGKILL)
            service.wait(timeout=30)
        notify.sock.close()

"""Running the service or a command as an unprivileged user from a root test run (root reads
everything): a service account, and making the interpreter under a 0700 home reachable."""

from __future__ import annotations

import contextlib
import os
import pwd
import shutil
import stat
import subprocess
import sys
import tempfile
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path

UNPRIVILEGED = "nobody"
SERVICE_USER = "medbatch-test"


@contextlib.contextmanager
def reachable(paths: Iterable[Path]) -> Iterator[None]:
    """Give others search (x) permission on every ancestor folder of `paths` that lacks it;
    restore the exact modes afterwards."""
    changed: dict[Path, int] = {}
    for path in paths:
        for folder in [*_chain(Path(path)), *_chain(Path(os.path.realpath(path)))]:
            if folder in changed or not folder.is_dir():
                continue
            mode = stat.S_IMODE(folder.stat().st_mode)
            if not mode & stat.S_IXOTH:
                changed[folder] = mode
                folder.chmod(mode | stat.S_IXOTH)
    try:
        yield
    finally:
        for folder, mode in changed.items():
            folder.chmod(mode)


def _chain(path: Path) -> list[Path]:
    absolute = Path(os.path.abspath(path))
    return [absolute, *absolute.parents]


def interpreter_paths() -> list[Path]:
    """What running `sys.executable` needs: the venv's link, its real file, the standard
    library and the venv's site-packages."""
    return [
        Path(sys.executable),
        Path(os.path.realpath(sys.executable)),
        Path(os.__file__).parent,
        Path(sys.prefix),
    ]


def run_as_unprivileged() -> dict[str, object]:
    """subprocess arguments that drop every root identity: uid, gid and supplementary groups
    (with gid 0 kept, group permission bits of root's folders would still apply)."""
    return {"user": UNPRIVILEGED, "group": "nogroup", "extra_groups": []}


def ensure_user(name: str = SERVICE_USER) -> pwd.struct_passwd:
    """The account, created as a system user on first use (CI runs the tests as root)."""
    try:
        return pwd.getpwnam(name)
    except KeyError:
        subprocess.run(
            ["useradd", "--system", "--no-create-home", "--shell", "/usr/sbin/nologin", name],
            check=True,
            capture_output=True,
        )
        return pwd.getpwnam(name)


@contextmanager
def owned_tree(user: pwd.struct_passwd) -> Iterator[Path]:
    """A temp folder the account owns, reachable by it (pytest's tmp_path is root-only)."""
    root = Path(tempfile.mkdtemp(prefix="medbatch-user-"))
    try:
        root.chmod(0o755)
        os.chown(root, user.pw_uid, user.pw_gid)
        yield root
    finally:
        shutil.rmtree(root, ignore_errors=True)


def chown_tree(root: Path, user: pwd.struct_passwd) -> None:
    for folder, dirs, files in os.walk(root):
        for name in [folder, *(os.path.join(folder, d) for d in dirs)]:
            os.chown(name, user.pw_uid, user.pw_gid)
        for name in files:
            os.chown(os.path.join(folder, name), user.pw_uid, user.pw_gid, follow_symlinks=False)


def as_user(command: list[str], user: str, stage: Path) -> list[str]:
    """`command` run as `user`. Our interpreter may live under root's 0700 home (pyenv): in a
    private mount namespace, that home is covered by an empty 0755 tmpfs into which only the
    interpreter's folder is bound back, so the account reaches Python and nothing else of root's."""
    prefix = Path(sys.base_prefix).resolve()
    home = Path("/root")
    if home not in prefix.parents:
        return ["setpriv", f"--reuid={user}", f"--regid={user}", "--init-groups", "--", *command]
    top = home / prefix.relative_to(home).parts[0]
    stage.mkdir(exist_ok=True)
    script = (
        'mount --bind "$1" "$2" && mount -t tmpfs -o mode=0755 tmpfs /root && '
        'mkdir -p "$1" && mount --bind "$2" "$1" && shift 3 && '
        'exec setpriv --reuid="$0" --regid="$0" --init-groups -- "$@"'
    )
    return [
        "unshare", "--mount", "--propagation", "private", "sh", "-c", script,
        user, str(top), str(stage), "--", *command,
    ]  # fmt: skip

"""A non-root service account for tests that must not run the service as root (root reads all)."""

from __future__ import annotations

import os
import pwd
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

SERVICE_USER = "medbatch-test"


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

"""A non-root service account for tests that must not run the service as root (root reads all)."""

from __future__ import annotations

import os
import pwd
import shutil
import subprocess
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

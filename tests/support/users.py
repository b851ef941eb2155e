"""Running a command as an unprivileged user from a root test run: the interpreter (which may
live under a 0700 home) and the test's folders must be reachable by that user."""

from __future__ import annotations

import contextlib
import os
import stat
import sys
from collections.abc import Iterable, Iterator
from pathlib import Path

UNPRIVILEGED = "nobody"


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

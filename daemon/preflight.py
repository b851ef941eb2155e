"""Checks of the world a config points at, made before anything is touched: folders that exist
(or can be made) and that this user can use, the claim rename staying on one filesystem, and the
metrics port. Run by `check-config` and by `run` before the service starts."""

from __future__ import annotations

import errno
import os
import socket
from pathlib import Path

from daemon.config import Settings, parse_address
from daemon.errors import ConfigError


def problems(settings: Settings, *, bind: bool) -> list[ConfigError]:
    """Everything wrong, each naming its key; `bind` also tries the metrics port."""
    found: list[ConfigError] = []
    paths = settings.paths
    for key in ("inbox", "outbox", "state", "quarantine"):
        problem = _folder_problem(getattr(paths, key))
        if problem:
            found.append(ConfigError(f"paths.{key}", problem))
    if not found:
        for p in settings.pipeline:
            problem = _folder_problem(paths.inbox / p.name)
            if problem:
                found.append(ConfigError(f"pipeline[{p.name}]", f"inbox folder: {problem}"))
        if _device(paths.inbox) != _device(paths.state):
            found.append(
                ConfigError(
                    "paths.state",
                    f"{paths.state} must be on the same filesystem as paths.inbox "
                    f"({paths.inbox}): claiming a file is a rename into state/spool",
                )
            )
        if paths.journal.exists() and not os.access(paths.journal, os.R_OK | os.W_OK):
            found.append(
                ConfigError(
                    "paths.state",
                    f"{paths.journal} is not readable and writable by uid "
                    f"{os.geteuid()}: run medbatch as the user that owns it",
                )
            )
    address = settings.service.metrics_address
    if bind and address:
        problem = _bind_problem(address)
        if problem:
            found.append(ConfigError("service.metrics_address", problem))
    return found


def check(settings: Settings, *, bind: bool) -> None:
    """Raise the first problem (ConfigError, exit 78); the message lists any others."""
    found = problems(settings, bind=bind)
    if found:
        first, rest = found[0], found[1:]
        if rest:
            raise ConfigError(
                first.key,
                f"{str(first).split(': ', 1)[1]} (and: " + "; ".join(str(e) for e in rest) + ")",
            )
        raise first


def _existing_ancestor(path: Path) -> Path:
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def _folder_problem(folder: Path) -> str | None:
    """Why this user could not use `folder` (made if missing), or None."""
    if folder.is_symlink():
        return f"{folder} is a symbolic link; give the real folder"
    if folder.exists():
        if not folder.is_dir():
            return f"{folder} exists and is not a folder"
        if not os.access(folder, os.R_OK | os.W_OK | os.X_OK):
            return f"{folder} is not readable and writable by uid {os.geteuid()}"
        return None
    parent = _existing_ancestor(folder)
    if not parent.is_dir() or not os.access(parent, os.W_OK | os.X_OK):
        return f"{folder} does not exist and cannot be made ({parent} is not writable)"
    return None


def _device(folder: Path) -> int:
    return os.stat(_existing_ancestor(folder)).st_dev


def _bind_problem(address: str) -> str | None:
    host, port = parse_address(address)
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((host, port))
        except OSError as exc:
            name = errno.errorcode.get(exc.errno or 0, "error")
            return f"cannot listen on {address}: {exc.strerror} ({name})"
    return None

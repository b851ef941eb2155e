"""Pure checks on names and stat results: what intake may take, under which spool name."""

from __future__ import annotations

import os
import stat
from typing import NamedTuple, Protocol

from daemon.models import Reason


class Rules(Protocol):
    """What a claim checks of its pipeline (a config `Pipeline` is one). The claimer process
    gets `ClaimRules`, so that it imports neither pydantic nor the config."""

    @property
    def max_file_bytes(self) -> int: ...
    @property
    def allow_hard_links(self) -> bool: ...
    @property
    def allowed_uids(self) -> tuple[int, ...] | None: ...


class ClaimRules(NamedTuple):
    max_file_bytes: int
    allow_hard_links: bool
    allowed_uids: tuple[int, ...] | None

    @classmethod
    def of(cls, pipeline: Rules) -> ClaimRules:
        return cls(pipeline.max_file_bytes, pipeline.allow_hard_links, pipeline.allowed_uids)


IGNORED_SUFFIXES = (".part", ".tmp", ".crdownload", "~")
_SUFFIX_CHARS = frozenset("abcdefghijklmnopqrstuvwxyz0123456789.")


def is_ignored(name: str) -> bool:
    """Hidden and partial names wait until they are renamed (write-then-rename)."""
    return name.startswith(".") or name.endswith(IGNORED_SUFFIXES)


def spool_suffix(name: str) -> str:
    """The input's extension, sanitised: processors detect formats by it."""
    dot = name.rfind(".")  # as `PurePath(name).suffix`, without building a path per file
    suffix = name[dot:].lower() if dot > 0 else ""
    return suffix if 1 < len(suffix) <= 10 and set(suffix) <= _SUFFIX_CHARS else ""


def recorded_name(name: str) -> str:
    """The name as text the journal, manifests and audit log can hold: bytes that are not UTF-8
    (surrogate-escaped by Python) become a literal `\\xNN`. Only ever data, never a path."""
    return os.fsencode(name).decode("utf-8", "backslashreplace")


def kind_of(mode: int) -> Reason:
    if stat.S_ISLNK(mode):
        return Reason.SYMLINK
    if stat.S_ISDIR(mode):
        return Reason.DIRECTORY
    if stat.S_ISFIFO(mode):
        return Reason.FIFO
    if stat.S_ISSOCK(mode):
        return Reason.SOCKET
    if stat.S_ISCHR(mode) or stat.S_ISBLK(mode):
        return Reason.DEVICE
    return Reason.NOT_REGULAR_FILE


def refusal(pipeline: Rules, st: os.stat_result) -> Reason | None:
    """Why an entry must not be taken, or None: the same checks on the lstat and on the fd."""
    if not stat.S_ISREG(st.st_mode):
        return kind_of(st.st_mode)
    if st.st_nlink > 1 and not pipeline.allow_hard_links:
        return Reason.HARD_LINK
    if pipeline.allowed_uids is not None and st.st_uid not in pipeline.allowed_uids:
        return Reason.OWNER_NOT_ALLOWED
    if st.st_size > pipeline.max_file_bytes:
        return Reason.TOO_LARGE
    return None


def identity(st: os.stat_result) -> tuple[int, int, int, int, int, int]:
    """What must not change between the check and the end of the claim. ctime is left out:
    our own rename and fchmod change it."""
    return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_uid, st.st_nlink)

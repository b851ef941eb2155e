"""Name hashing: in a `hash_names` pipeline (the default) every name that leaves the service is a
keyed hash; the real name stays in the 0600 journal. Key: `<state>/audit-name.key` (0600).
"""

from __future__ import annotations

import functools
import hashlib
import hmac
import os
import secrets
from pathlib import Path

from daemon.errors import MedbatchError
from daemon.fsutil import fsync_dir, write_all

NAME_KEY_FILE = "audit-name.key"
# The audit chain's HMAC key: only the service (and `audit verify` as its user) can read it.
CHAIN_KEY_FILE = "audit-chain.key"
NAME_KEY_BYTES = 32
NAME_HASH_PREFIX = "hmac-sha256:"


class NameKeyError(MedbatchError):
    """A service key (names, chain) is unreadable or not 32 bytes; refusing to use another."""


@functools.lru_cache(maxsize=16384)  # a claimed name is hashed again for its audit line and task
def hash_name(key: bytes, name: str) -> str:
    """The keyed hash written instead of a file name: stable for one key, useless without it."""
    raw = name.encode("utf-8", "surrogateescape")
    return NAME_HASH_PREFIX + hmac.new(key, raw, hashlib.sha256).hexdigest()[:32]


def load_name_key(state: Path) -> bytes:
    """`<state>/audit-name.key`, created (32 random bytes, mode 0600) on first use."""
    return load_key(state, NAME_KEY_FILE)


def read_name_key(state: Path) -> bytes | None:
    """The name key if it exists (None if not); NameKeyError if it is not 32 bytes."""
    return read_key(state, NAME_KEY_FILE)


def load_chain_key(state: Path) -> bytes:
    """`<state>/audit-chain.key`, created (32 random bytes, mode 0600) on first start."""
    return load_key(state, CHAIN_KEY_FILE)


def read_chain_key(state: Path) -> bytes | None:
    """The chain key if it exists (None before the service's first keyed start)."""
    return read_key(state, CHAIN_KEY_FILE)


def load_key(state: Path, file_name: str) -> bytes:
    """`<state>/<file_name>`, created (32 random bytes, mode 0600) on first use."""
    path = state / file_name
    key = read_key(state, file_name)
    if key is not None:
        return key
    state.mkdir(parents=True, exist_ok=True, mode=0o750)
    tmp = state / f".{file_name}.{secrets.token_hex(4)}"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC | os.O_NOFOLLOW, 0o600)
    try:
        write_all(fd, secrets.token_bytes(NAME_KEY_BYTES))
        os.fsync(fd)
    finally:
        os.close(fd)
    try:
        # link() never replaces: if another process created the key meanwhile, theirs wins.
        os.link(tmp, path)
        fsync_dir(state)
    except FileExistsError:
        pass
    finally:
        tmp.unlink()
    key = read_key(state, file_name)
    assert key is not None
    return key


def read_key(state: Path, file_name: str) -> bytes | None:
    """A service key if it exists (None if not); NameKeyError if it is not 32 bytes."""
    path = state / file_name
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW)
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise NameKeyError(f"cannot read {path}: {exc.strerror}") from None
    try:
        key = os.read(fd, NAME_KEY_BYTES + 1)
    finally:
        os.close(fd)
    if len(key) != NAME_KEY_BYTES:
        raise NameKeyError(
            f"{path} holds {len(key)} bytes, not {NAME_KEY_BYTES}; restore it from a backup "
            "(a new key would make earlier hashed names untraceable)"
        )
    return key


# Only known data extensions are kept: any other (`Doe.John`) could itself be a name.
_KNOWN_SUFFIXES = frozenset(
    [
        ".csv",
        ".tsv",
        ".txt",
        ".parquet",
        ".pq",
        ".json",
        ".jsonl",
        ".dcm",
        ".dicom",
        ".nii",
        ".png",
        ".jpg",
        ".jpeg",
        ".tif",
        ".tiff",
        ".vcf",
        ".bed",
        ".maf",
        ".xlsx",
        ".h5",
        ".npy",
        ".zip",
    ]
)
_COMPRESSED = frozenset({".gz", ".bz2", ".xz", ".zst", ".zstd"})


def safe_suffix(name: str) -> str:
    """The name's extension (`.csv`, `.nii.gz`) if a known data one, else ''; never identity."""
    parts = ["." + p.lower() for p in name.rsplit("/", 1)[-1].lstrip(".").split(".")[1:]]
    kept = ""
    if parts and parts[-1] in _COMPRESSED:
        kept = parts.pop()
    if parts and parts[-1] in _KNOWN_SUFFIXES:
        return parts[-1] + kept
    return kept


def hashed_file_name(key: bytes, name: str) -> str:
    """A file name carrying no identity: the hex of `hash_name` plus a safe extension."""
    return hash_name(key, name).removeprefix(NAME_HASH_PREFIX) + safe_suffix(name)

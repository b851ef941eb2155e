"""The start-up probe: every Dask worker must see the spool and write the outbox at our paths.

Runs `probe_worker` on each worker (shipped by reference: workers import this package).
"""

from __future__ import annotations

import os
import secrets
import socket
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path

import structlog

from daemon import __version__
from daemon.config import PathsConfig
from daemon.errors import MedbatchError
from daemon.processors import known_kinds

log = structlog.get_logger()


PROBE_PREFIX = ".medbatch-probe-"


def probe_worker(marker: str, outbox: str, token: str, kinds: tuple[str, ...]) -> dict[str, str]:
    """On a Dask worker: does it read our spool and write our outbox, and know our kinds?

    Returns ``{"problem": ...}`` or ``{"reply": <file it wrote in the outbox>, "version": ...}``:
    plain types, so that the scheduler passes the answer back without importing medbatch.
    """
    spool = Path(marker).parent
    try:
        seen = Path(marker).read_text(encoding="utf-8")
    except FileNotFoundError:
        return {"problem": f"cannot see the spool {spool}: it must be the same shared storage"}
    except OSError as exc:
        return {"problem": f"cannot read the spool {spool} ({exc.strerror})"}
    if seen != token:
        return {"problem": f"sees another {spool}: it must be the same shared storage"}
    missing = sorted(set(kinds) - set(known_kinds()))
    if missing:
        return {"problem": f"has no processor for {', '.join(missing)}: install the same plug-ins"}
    reply = f"{PROBE_PREFIX}{token}-{socket.gethostname()}-{os.getpid()}"
    try:
        Path(outbox, reply).write_text(token, encoding="utf-8")
    except OSError as exc:
        return {"problem": f"cannot write to the outbox {outbox} ({exc.strerror})"}
    return {"reply": reply, "version": __version__}


def probe_cluster(
    run: Callable[..., Mapping[str, object]], paths: PathsConfig, kinds: Iterable[str]
) -> int:
    """Run `probe_worker` on every worker through `run` (Client.run); raise MedbatchError naming
    the first worker and path that is not shared. Returns the number of workers probed."""
    token = secrets.token_hex(8)
    marker = paths.spool / f"{PROBE_PREFIX}{token}"
    marker.write_text(token, encoding="utf-8")
    try:
        replies = run(probe_worker, str(marker), str(paths.outbox), token, tuple(sorted(kinds)))
    finally:
        marker.unlink(missing_ok=True)
    for worker, reply in sorted(replies.items()):
        _check_reply(worker, reply, paths.outbox, token)
    return len(replies)


def _check_reply(worker: str, reply: object, outbox: Path, token: str) -> None:
    if not isinstance(reply, dict):
        raise MedbatchError(
            f"Dask worker {worker} could not run medbatch's probe ({reply!r}): "
            "install medbatch on every worker"
        )
    if "problem" in reply:
        raise MedbatchError(f"Dask worker {worker} {reply['problem']}")
    name = reply.get("reply")
    if not isinstance(name, str) or "/" in name:
        raise MedbatchError(f"Dask worker {worker} gave an unexpected probe reply: {reply!r}")
    written = outbox / name
    try:
        seen = written.read_text(encoding="utf-8")
    except FileNotFoundError:
        seen = None
    finally:
        written.unlink(missing_ok=True)
    if seen != token:
        raise MedbatchError(
            f"Dask worker {worker} writes to another {outbox}: it must be the same shared storage"
        )
    if reply.get("version") != __version__:
        log.warning("dask.version_mismatch", worker=worker, version=reply.get("version"))


# -- the executor --------------------------------------------------------------------------

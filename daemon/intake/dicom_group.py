"""A claimed file's batch group: its DICOM series or study, read from a bounded header (main loop).

Only the first HEADER_BYTES are read (inflated to at most INFLATED_BYTES for the Deflated transfer
syntax), parsing stops past the two UIDs, and the UID leaves as a keyed hash, never as itself.
"""

from __future__ import annotations

import io
import logging
import os
import warnings
import zlib
from pathlib import Path
from typing import Literal

from daemon.audit.names import hash_name
from daemon.config import Pipeline
from daemon.models import UNKNOWN_GROUP

PREAMBLE_BYTES = 132  # 128-byte preamble + "DICM"
# Headers up to (0020,000E) are a few KiB; large private blocks (GE's 0019) stay well under this.
HEADER_BYTES = 256 << 10
INFLATED_BYTES = 1 << 20
# The UID tags (group 0020) sort after everything that precedes them: stop reading there.
_LAST_TAG = 0x0020000E
_KEYWORDS = {"series": "SeriesInstanceUID", "study": "StudyInstanceUID"}
_MAX_UID_CHARS = 64
_OPEN_SPOOLED = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC

BatchBy = Literal["series", "study"]


def group_for(pipeline: Pipeline, path: Path | str, key: bytes | None) -> str:
    """The batch group of a file claimed into `pipeline`: "" unless it batches by series/study."""
    if pipeline.batch_by == "arrival" or key is None:
        return ""
    return group_key(path, pipeline.batch_by, key)


def group_key(path: Path | str, batch_by: BatchBy, key: bytes) -> str:
    """`<batch_by>:<keyed hash of the UID>`, or UNKNOWN_GROUP; never raises on a bad file."""
    uid = read_uid(path, _KEYWORDS[batch_by])
    if uid is None:
        return UNKNOWN_GROUP
    return f"{batch_by}:{hash_name(key, uid).rsplit(':', 1)[-1]}"


def read_uid(path: Path | str, keyword: str) -> str | None:
    """The UID named by `keyword` from a DICOM Part 10 header, or None."""
    try:
        # The spooled copy intake just checked: still never followed, never blocked on.
        fd = os.open(path, _OPEN_SPOOLED)
    except OSError:
        return None
    try:
        head = os.read(fd, HEADER_BYTES)
    except OSError:
        return None
    finally:
        os.close(fd)
    if head[128:PREAMBLE_BYTES] != b"DICM":
        return None
    # pydicom warns (and logs, see _parse) with the offending value quoted: a UID must not
    # reach a log.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            return _parse(head, keyword)
        except Exception:  # any malformed header is simply "no group"
            return None


def _parse(head: bytes, keyword: str) -> str | None:
    from pydicom.filereader import read_dataset  # only grouped pipelines pay for the import
    from pydicom.uid import UID

    # pydicom's log records quote the values they complain about; none belongs in this process.
    logging.getLogger("pydicom").disabled = True
    fp = io.BytesIO(head)
    fp.seek(PREAMBLE_BYTES)
    meta = read_dataset(fp, False, True, stop_when=lambda tag, vr, length: tag.group != 2)
    syntax = UID(str(meta.get("TransferSyntaxUID", "")))
    body = head[fp.tell() :]
    is_implicit, is_little = False, True
    if syntax.is_deflated:
        body = _inflate_prefix(body)
    elif syntax.is_transfer_syntax:
        is_implicit, is_little = syntax.is_implicit_VR, syntax.is_little_endian
    dataset = read_dataset(
        io.BytesIO(body),
        is_implicit,
        is_little,
        stop_when=lambda tag, vr, length: tag > _LAST_TAG,
        specific_tags=[0x0020000D, 0x0020000E],
    )
    value = str(dataset.get(keyword) or "").strip("\0 ")
    return value if 0 < len(value) <= _MAX_UID_CHARS else None


def _inflate_prefix(body: bytes) -> bytes:
    """The first INFLATED_BYTES of a raw-deflate body: a bomb costs no more than that."""
    inflater = zlib.decompressobj(-zlib.MAX_WBITS)
    return inflater.decompress(body, INFLATED_BYTES)

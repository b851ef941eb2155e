"""Genomics input, bounded before parsing: compression found by content (never by extension),
refused unless the pipeline allows it, else stream-decoded under a size and a ratio cap; the
header read from the decoded bytes; columns and rows counted before Arrow parses. Runs in workers.
"""

from __future__ import annotations

import bz2
import csv
import gzip
import lzma
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow as pa

from daemon.fsutil import read_chunks
from daemon.processors.base import ProcessorError
from daemon.processors.options import GenomicsOptions

__all__ = ["TableInput", "open_table"]

HEADER_MAX_BYTES = 16 << 20  # a wide header: one name per sample
CHUNK_BYTES = 8 << 20
# zstd frames (and the skippable frames that can hide a header) and LZ4 frames, little-endian.
ZSTD_MAGICS = (b"\x28\xb5\x2f\xfd", *(bytes([0x50 + i, 0x2A, 0x4D, 0x18]) for i in range(16)))
MAGICS: dict[str, tuple[bytes, ...]] = {
    "gzip": (b"\x1f\x8b",),
    "bz2": (b"BZh",),
    "xz": (b"\xfd7zXZ\x00",),
    "zstd": ZSTD_MAGICS,
    "lz4": (b"\x04\x22\x4d\x18",),
    "zip": (b"PK\x03\x04",),
}


DECODERS = ("gzip", "bz2", "xz", "zstd", "lz4")


def _decoder(path: Path, kind: str) -> Any:
    """A stream of the decoded bytes, read a bounded chunk at a time; closed by the caller."""
    if kind == "gzip":
        return gzip.open(path, "rb")
    if kind == "bz2":
        return bz2.open(path, "rb")
    if kind == "xz":
        return lzma.open(path, "rb")
    return pa.CompressedInputStream(pa.OSFile(str(path)), kind)


@dataclass(frozen=True, slots=True)
class TableInput:
    """A checked table: its decoded bytes (if it was compressed), delimiter and column names."""

    path: Path
    data: bytearray | None
    delimiter: str
    names: list[str]
    compression: str | None

    def open(self) -> Any:
        """A fresh Arrow stream of the table's text. A file object, not a path: given a path,
        Arrow would decompress by the name's extension, unchecked."""
        return pa.BufferReader(self.data) if self.data is not None else pa.OSFile(str(self.path))


def compression_of(head: bytes) -> str | None:
    return next((kind for kind, magics in MAGICS.items() if head.startswith(magics)), None)


def _decode(path: Path, kind: str, options: GenomicsOptions) -> bytearray:
    """The whole decoded stream, a chunk at a time, refused as soon as it passes the size cap
    or `max_compression_ratio` times the compressed size."""
    if kind not in DECODERS:
        raise ProcessorError(path, "unsupported_compression", f"{kind} input is not supported")
    cap = min(options.max_decoded_bytes, options.max_compression_ratio * path.stat().st_size)
    out = bytearray()
    try:
        with _decoder(path, kind) as stream:
            while chunk := stream.read(CHUNK_BYTES):
                out += chunk
                if len(out) > cap:
                    raise ProcessorError(
                        path,
                        "decompression_bomb",
                        f"{kind} input decodes past {cap} bytes (max_decoded_bytes "
                        f"{options.max_decoded_bytes}, max_compression_ratio "
                        f"{options.max_compression_ratio})",
                    )
    except (OSError, EOFError, lzma.LZMAError, pa.ArrowException) as exc:
        raise ProcessorError(
            path, "bad_compression", f"{kind} stream could not be decoded ({type(exc).__name__})"
        ) from None
    return out  # not bytes(out): that would be a second copy of it all


def _parse_header(path: Path, first: bytes, max_columns: int) -> tuple[str, list[str]]:
    """The delimiter (tab if the first line has one, else comma) and the column names."""
    if not first.strip():
        raise ProcessorError(path, "empty", "no header line")
    if b"\x00" in first:
        raise ProcessorError(path, "bad_table", "binary content, not a text table")
    try:
        line = first.decode("utf-8-sig")
    except UnicodeDecodeError:
        raise ProcessorError(path, "bad_table", "the header is not UTF-8 text") from None
    delimiter = "\t" if "\t" in line else ","
    # Counted before splitting: 150,000 sample columns cost gigabytes once parsed.
    if line.count(delimiter) + 1 > max_columns:
        raise ProcessorError(path, "too_many_columns", f"more than max_columns ({max_columns})")
    names = next(csv.reader([line.rstrip("\r\n")], delimiter=delimiter))
    if len(set(names)) != len(names):
        raise ProcessorError(path, "bad_table", "duplicate column names")
    return delimiter, names


def _count_lines(path: Path, data: bytearray | None) -> int:
    """Newlines in the decoded bytes, or in the file a chunk at a time (C speed, no copy kept)."""
    if data is not None:
        return data.count(b"\n") + (1 if data and not data.endswith(b"\n") else 0)
    lines, last = 0, b"\n"
    with path.open("rb", buffering=0) as fh:
        for chunk in read_chunks(fh.fileno(), CHUNK_BYTES):
            buffer = chunk.obj  # counted in place: the chunk is its first len(chunk) bytes
            assert isinstance(buffer, bytearray)
            lines += buffer.count(b"\n", 0, len(chunk))
            last = bytes(chunk[-1:])
    return lines + (last != b"\n")


def _check_rows(path: Path, data: bytearray | None, max_rows: int) -> None:
    if _count_lines(path, data) - 1 > max_rows:
        raise ProcessorError(path, "too_many_rows", f"more than max_rows ({max_rows})")


def open_table(path: Path, options: GenomicsOptions) -> TableInput:
    """Check a table's compression, size, header and row count; never parse it."""
    size = path.stat().st_size
    if size == 0:
        raise ProcessorError(path, "empty", "the file has no bytes")
    with path.open("rb") as fh:
        head = fh.readline(HEADER_MAX_BYTES)
    kind = compression_of(head)
    data: bytearray | None = None
    if kind is not None:
        if not options.compressed:
            raise ProcessorError(
                path, "compressed_input", f"{kind}-compressed (allow with compressed = true)"
            )
        data = _decode(path, kind, options)
        end = data.find(b"\n", 0, HEADER_MAX_BYTES)
        head = bytes(data[: HEADER_MAX_BYTES if end < 0 else end])
    delimiter, names = _parse_header(path, head.split(b"\n", 1)[0], options.max_columns)
    _check_rows(path, data, options.max_rows)
    return TableInput(path, data, delimiter, names, kind)

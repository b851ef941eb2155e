"""Hostile-text checks for EMR text tables, in the same pass that feeds the streaming parser:
decoded bytes (compressed files inflate within caps), header, encoding, line and row limits.
Runs in worker processes."""

from __future__ import annotations

import bz2
import codecs
import csv
import gzip
import lzma
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

from daemon.errors import ProcessorError
from daemon.processors.options import EmrOptions

CHUNK_BYTES = 1 << 20
DELIMITERS = (",", ";", "\t", "|")
COMPRESSED = {".gz": "gzip", ".bz2": "bz2", ".zst": "zstd", ".zstd": "zstd", ".xz": "xz"}
# Below this many decoded bytes the ratio cap does not apply (tiny files compress very well).
_RATIO_FLOOR_BYTES = 16 << 20
_NEWLINE = 10
_UTF8_BOM = codecs.BOM_UTF8
_TRY_ENCODING = {"utf-8": "cp1252", "cp1252": "latin-1", "latin-1": "utf-8"}


@dataclass(frozen=True, slots=True)
class Header:
    delimiter: str
    names: list[str]
    encoding: str


def table_suffix(path: Path) -> str:
    """The suffix that says what the table is: "x.csv.gz" is a ".csv"."""
    suffixes = [s.lower() for s in path.suffixes]
    if suffixes and suffixes[-1] in COMPRESSED:
        suffixes.pop()
    return suffixes[-1] if suffixes else ""


# Each closed by `Decoded.close`, with the stored file under it.
_DECODERS: dict[str, Callable[[Any], Any]] = {
    "gzip": lambda raw: gzip.GzipFile(fileobj=raw, mode="rb"),
    "bz2": bz2.BZ2File,
    "xz": lzma.LZMAFile,
    "zstd": lambda raw: pa.CompressedInputStream(raw, "zstd"),
}


class Decoded:
    """A binary file of a table's decoded bytes (gzip, bz2, xz in C through the standard
    library; zstd through pyarrow), and how many stored bytes it has consumed so far."""

    def __init__(self, path: Path, options: EmrOptions) -> None:
        self.kind = COMPRESSED.get(path.suffix.lower())
        if self.kind is not None and options.compressed == "refuse":
            raise ProcessorError(
                path, "compressed", f"{self.kind} text is refused (compressed = refuse)"
            )
        self.raw = pa.OSFile(str(path)) if self.kind == "zstd" else path.open("rb")
        self.stream: Any = _DECODERS[self.kind](self.raw) if self.kind else self.raw

    @property
    def consumed(self) -> int:
        return int(self.raw.tell())

    def read(self, size: int) -> bytes:
        data: bytes = self.stream.read(size)
        return data

    def close(self) -> None:
        self.stream.close()
        self.raw.close()


class ScannedStream:
    """A read-only file over a text table's decoded bytes that refuses it while it is read: no
    NUL (binary), valid text in the encoding, no line longer than `max_row_bytes`, a header no
    wider than `max_columns`, no more than `max_rows` lines, an even number of quote characters,
    and within the decompression caps. `pa.PythonFile(stream)` hands it to pyarrow."""

    closed = False

    def __init__(self, path: Path, options: EmrOptions) -> None:
        self.path = path
        self.options = options
        self.source = Decoded(path, options)
        self.decoded = 0
        self.newlines = 0
        self.quotes = 0
        self.offset = 0  # of the next byte handed to the parser
        self.last_newline = -1
        try:
            self.replay = self._read_head()
            self.header = self._read_header(self.replay)
        except BaseException:
            self.source.close()
            raise
        self.decoder = codecs.getincrementaldecoder(self.header.encoding)("strict")

    # -- the file protocol pyarrow uses ------------------------------------------------------

    def read(self, size: int = -1) -> bytes:
        if self.replay:
            chunk, self.replay = self.replay, b""
        else:
            chunk = self._pull(CHUNK_BYTES if size is None or size < 0 else max(size, 1))
        if chunk:
            self._feed(chunk)
        else:
            self._finish()
        return chunk

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return False

    def close(self) -> None:
        self.closed = True
        self.source.close()

    def __enter__(self) -> ScannedStream:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    # -- checks ------------------------------------------------------------------------------

    def refuse(self, reason: str, detail: str) -> ProcessorError:
        return ProcessorError(self.path, reason, detail)

    def _pull(self, size: int) -> bytes:
        try:
            chunk = self.source.read(size)
        except (OSError, EOFError, lzma.LZMAError, ValueError, pa.ArrowException):
            raise self.refuse("bad_compression", "the compressed stream is corrupt") from None
        self.decoded += len(chunk)
        if self.source.kind is not None:
            self._check_inflation()
        return chunk

    def _check_inflation(self) -> None:
        if self.decoded > self.options.max_decoded_bytes:
            limit = self.options.max_decoded_bytes
            raise self.refuse("decompression_bomb", f"decodes past max_decoded_bytes ({limit})")
        # Against the stored bytes consumed so far: padding a bomb with more data cannot dilute it.
        ratio = self.decoded / max(self.source.consumed, 1)
        if self.decoded > _RATIO_FLOOR_BYTES and ratio > self.options.max_ratio:
            limit = self.options.max_ratio
            raise self.refuse("decompression_bomb", f"inflates more than max_ratio ({limit})x")

    def _read_head(self) -> bytes:
        """The first chunk, extended to the end of the header line (bounded)."""
        head = self._pull(CHUNK_BYTES)
        while b"\n" not in head:
            more = self._pull(CHUNK_BYTES)
            if not more:
                break
            head += more
            if len(head) > self.options.max_row_bytes:
                limit = self.options.max_row_bytes
                raise self.refuse("row_too_large", f"a line is longer than max_row_bytes ({limit})")
        return head

    def _encoding(self, head: bytes) -> str:
        chosen = self.options.encoding
        if head.startswith(_UTF8_BOM):
            return "utf-8"
        if chosen != "auto":
            return chosen
        try:
            codecs.getincrementaldecoder("utf-8")("strict").decode(head)
            return "utf-8"
        except UnicodeDecodeError:
            pass
        try:
            head.decode("cp1252")
            return "cp1252"
        except UnicodeDecodeError:
            return "latin-1"

    def _read_header(self, head: bytes) -> Header:
        if b"\x00" in head:
            raise self.refuse("not_text", "NUL bytes: binary content, not a text table")
        encoding = self._encoding(head)
        line = head.split(b"\n", 1)[0]
        try:
            text = line.decode(encoding).removeprefix("\ufeff").rstrip("\r")
        except UnicodeDecodeError:
            raise self.not_decodable(encoding) from None
        if not text.strip():
            raise self.refuse("empty", "no header line")
        delimiter = self.options.field_delimiter or sniff_delimiter(self.path, text)
        # A delimiter count first: refused before any list of 100,000 names is built.
        width = text.count(delimiter) + 1
        if width > self.options.max_columns:
            limit = self.options.max_columns
            raise self.refuse("too_many_columns", f"{width} columns, max_columns is {limit}")
        names = next(csv.reader([text], delimiter=delimiter))
        if len(set(names)) != len(names) or not all(names):
            raise self.refuse("bad_header", "empty or duplicate column names")
        return Header(delimiter, names, encoding)

    def not_decodable(self, encoding: str) -> ProcessorError:
        reason = "not_utf8" if encoding == "utf-8" else f"not_{encoding.replace('-', '')}"
        hint = _TRY_ENCODING.get(encoding, "auto")
        return self.refuse(reason, f"not {encoding} text (try encoding = {hint!r})")

    def _feed(self, chunk: bytes) -> None:
        if b"\x00" in chunk:
            raise self.refuse("not_text", "NUL bytes: binary content, not a text table")
        if self.header.encoding != "latin-1" and (
            self.decoder.getstate()[0] or not chunk.isascii()
        ):
            try:
                self.decoder.decode(chunk)
            except UnicodeDecodeError:
                raise self.not_decodable(self.header.encoding) from None
        self.quotes += chunk.count(b'"')
        offset = self.offset
        positions = np.flatnonzero(np.frombuffer(chunk, np.uint8) == _NEWLINE) + offset
        ends = np.concatenate(([self.last_newline], positions, [offset + len(chunk)]))
        if int(np.diff(ends).max()) - 1 > self.options.max_row_bytes:
            limit = self.options.max_row_bytes
            raise self.refuse("row_too_large", f"a line is longer than max_row_bytes ({limit})")
        self.newlines += positions.size
        if positions.size:
            self.last_newline = int(positions[-1])
        self.offset = offset + len(chunk)
        # Lines after the header; a last line without its newline counts too.
        if self.newlines - 1 > self.options.max_rows:
            raise self.refuse(
                "too_many_rows", f"more than max_rows ({self.options.max_rows}) lines"
            )

    def _finish(self) -> None:
        try:
            self.decoder.decode(b"", final=True)
        except UnicodeDecodeError:
            raise self.not_decodable(self.header.encoding) from None
        if self.quotes % 2:
            raise self.refuse("unterminated_quote", "a quoted field is never closed")


def check_quoting(stream: ScannedStream) -> None:
    """RFC 4180 quoting, strictly (Python's csv at ~100 MB/s, only for files with quotes):
    pyarrow is lenient, and two stray quotes make one cell of every line between them."""
    options, header = stream.options, stream.header
    csv.field_size_limit(options.max_row_bytes)
    raw = Decoded(stream.path, options)
    text = codecs.getreader(header.encoding)(raw.stream)
    try:
        for _ in csv.reader(text, delimiter=header.delimiter, strict=True):
            pass
    except csv.Error as exc:
        if "field limit" in str(exc):
            limit = options.max_row_bytes
            raise stream.refuse(
                "row_too_large", f"a field is longer than max_row_bytes ({limit})"
            ) from None
        raise stream.refuse("bad_quoting", "a quote that does not open or close a field") from None
    finally:
        raw.close()


def sniff_delimiter(path: Path, header: str) -> str:
    """The most frequent of , ; tab | in the header (tab for .tsv/.tab); a comma on a tie."""
    if table_suffix(path) in (".tsv", ".tab"):
        return "\t"
    counts = {d: header.count(d) for d in DELIMITERS}
    best = max(DELIMITERS, key=lambda d: counts[d])
    return best if counts[best] > counts[","] else ","

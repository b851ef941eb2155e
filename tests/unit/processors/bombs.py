"""Decoder bombs, generated in a moment (no binaries checked in): small files that decode to
far more than they weigh, in every compressed form the processors meet."""

from __future__ import annotations

import bz2
import io
import lzma
import struct
import zlib

import numpy as np
import pyarrow as pa
import pydicom
import tifffile
from PIL import Image
from pydicom.data import get_testdata_file
from pydicom.dataset import FileMetaDataset
from pydicom.filewriter import write_file_meta_info
from pydicom.uid import DeflatedExplicitVRLittleEndian

MIB = 1 << 20
RAW_DEFLATE = -15
GZIP = 31


def periodic_deflate(head: bytes, unit: bytes, n_units: int, wbits: int = RAW_DEFLATE) -> bytes:
    """deflate(head + unit * n_units) without compressing it all: once the compressor's output
    for one more `unit` repeats, the rest is that output repeated (a gzip trailer's CRC and
    length are then wrong, which only the very end of the stream would tell)."""
    comp = zlib.compressobj(9, zlib.DEFLATED, wbits)
    out = [comp.compress(head)]
    previous = b""
    for done in range(n_units):
        part = comp.compress(unit) + comp.flush(zlib.Z_SYNC_FLUSH)
        out.append(part)
        if part == previous:
            out.append(part * (n_units - done - 1))
            break
        previous = part
    return b"".join(out) + comp.flush()


# -- DICOM ------------------------------------------------------------------------------------


def _meta(syntax: str) -> bytes:
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.2"
    meta.MediaStorageSOPInstanceUID = "1.2.3.4"
    meta.TransferSyntaxUID = syntax
    out = io.BytesIO()
    write_file_meta_info(out, meta, enforce_standard=True)  # type: ignore[arg-type]
    return b"\x00" * 128 + b"DICM" + out.getvalue()


def deflated_dicom_bomb(zero_bytes: int) -> bytes:
    """A Deflated DICOM whose dataset is one private OB element of `zero_bytes` zeros: a few
    kilobytes a gigabyte."""
    element = struct.pack("<HH2sHI", 0x0009, 0x1000, b"OB", 0, zero_bytes)
    creator = struct.pack("<HH2sH", 0x0009, 0x0010, b"LO", 4) + b"BOMB"
    body = periodic_deflate(creator + element, b"\x00" * MIB, zero_bytes // MIB)
    return _meta(DeflatedExplicitVRLittleEndian) + body


def deflated_dicom(extra_zero_bytes: int = 0) -> bytes:
    """pydicom's CT_small.dcm re-encoded Deflated, with a private OB of zeros before its pixels."""
    source = get_testdata_file("CT_small.dcm")
    assert source is not None
    ds = pydicom.dcmread(source)
    if extra_zero_bytes:
        ds.add_new(0x00090010, "LO", "PAD")
        ds.add_new(0x00091000, "OB", b"\x00" * extra_zero_bytes)
    out = io.BytesIO()
    ds.save_as(out, implicit_vr=False, little_endian=True, enforce_file_format=True)
    ds2 = pydicom.dcmread(io.BytesIO(out.getvalue()))
    ds2.file_meta.TransferSyntaxUID = DeflatedExplicitVRLittleEndian
    deflated = io.BytesIO()
    ds2.save_as(deflated, enforce_file_format=True)
    return deflated.getvalue()


# -- PNG and TIFF --------------------------------------------------------------------------------


def png_chunk(kind: bytes, data: bytes) -> bytes:
    crc = zlib.crc32(kind + data) & 0xFFFFFFFF
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", crc)


def png_zeros(width: int, height: int, bit_depth: int, colour_type: int = 0) -> bytes:
    """A valid PNG of black pixels, its IDAT built without holding the raw image."""
    samples = {0: 1, 2: 3, 4: 2, 6: 4}[colour_type]
    row = b"\x00" * (1 + width * samples * bit_depth // 8)  # filter byte + the row
    checksum = 1
    for _ in range(height):
        checksum = zlib.adler32(row, checksum)
    raw = periodic_deflate(b"", row, height)
    idat = b"\x78\xda" + raw + struct.pack(">I", checksum)
    ihdr = struct.pack(">IIBBBBB", width, height, bit_depth, colour_type, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", ihdr) + png_chunk(b"IDAT", idat)
            + png_chunk(b"IEND", b""))  # fmt: skip


def tiff_zeros(pages: int, side: int, dtype: str) -> bytes:
    """A deflate TIFF of `pages` black pages of side x side, a few KB whatever its size."""
    out = io.BytesIO()
    page = np.zeros((side, side), dtype=dtype)
    with tifffile.TiffWriter(out) as tif:
        for _ in range(pages):
            tif.write(page, compression="zlib")
    return out.getvalue()


def png_image(pixels: np.ndarray) -> bytes:  # type: ignore[type-arg]
    out = io.BytesIO()
    Image.fromarray(pixels).save(out, format="PNG")
    return out.getvalue()


# -- genomics ---------------------------------------------------------------------------------

LONG_HEADER = b"gene,sample,expression\n"
LONG_ROW = b"GENE1,S1,1.5\n"


def long_rows(n_rows: int) -> bytes:
    return LONG_HEADER + LONG_ROW * n_rows


def varied_rows(n_rows: int, seed: int = 5) -> bytes:
    """A long table that compresses as real data does (a few times, not a thousand)."""
    values = np.random.default_rng(seed).normal(100.0, 25.0, n_rows)
    rows = (f"GENE{i % 97},S{i % 13},{v:.6f}\n" for i, v in enumerate(values))
    return LONG_HEADER + "".join(rows).encode()


def compress(kind: str, data: bytes) -> bytes:
    if kind == "gzip":
        return zlib.compress(data, 9, wbits=GZIP)
    if kind == "bz2":
        return bz2.compress(data, 9)
    if kind == "xz":
        return lzma.compress(data, preset=6)
    return pa.compress(data, kind, asbytes=True)  # type: ignore[no-any-return]


def zstd_hidden_header(real: bytes, decoy: bytes = b"patient_id,name\n") -> bytes:
    """A skippable zstd frame (holding a decoy header in clear) before the real table: a check
    of the raw bytes sees the decoy; the decoded stream starts with the real header."""
    skippable = struct.pack("<II", 0x184D2A50, len(decoy)) + decoy
    return skippable + compress("zstd", real)


def gzip_row_bomb(n_rows: int) -> bytes:
    """gzip of a long table of `n_rows` identical rows, in a few KB per million rows."""
    return periodic_deflate(LONG_HEADER, LONG_ROW * 80_000, max(1, n_rows // 80_000), wbits=GZIP)


def wide_header(n_samples: int) -> bytes:
    names = b",".join(b"S%d" % i for i in range(n_samples))
    return b"gene," + names + b"\nGENE1," + b",".join(b"1" for _ in range(n_samples)) + b"\n"

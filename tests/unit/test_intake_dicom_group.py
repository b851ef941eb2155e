"""Claim-time DICOM grouping: the series or study UID from a bounded header read, as a keyed hash;
anything else (not DICOM, unreadable, past the bound, a deflate bomb) is the "unknown" group."""

from __future__ import annotations

import logging
import struct
import time
import tracemalloc
import warnings
import zlib
from pathlib import Path

import pytest
from pydicom.data import get_testdata_file
from pydicom.uid import (
    DeflatedExplicitVRLittleEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
)

from daemon.intake.dicom_group import HEADER_BYTES, group_key, read_uid
from daemon.models import UNKNOWN_GROUP
from tests.support.dicom import ct_instance, new_uid

KEY = b"k" * 32


def write(tmp_path: Path, name: str, data: bytes) -> Path:
    path = tmp_path / name
    path.write_bytes(data)
    return path


@pytest.mark.parametrize(
    "syntax",
    [ExplicitVRLittleEndian, ImplicitVRLittleEndian, DeflatedExplicitVRLittleEndian],
    ids=["explicit_le", "implicit_le", "deflated"],
)
def test_series_and_study_read_in_every_transfer_syntax(tmp_path: Path, syntax: object) -> None:
    """Each UID is read as written, whatever the encoding of the dataset."""
    series, study = new_uid(), new_uid()
    path = write(tmp_path, "i.dcm", ct_instance(series, study, 1, syntax=syntax))  # type: ignore[arg-type]
    assert read_uid(path, "SeriesInstanceUID") == series
    assert read_uid(path, "StudyInstanceUID") == study


@pytest.mark.parametrize(
    "bundled", ["MR_small_bigendian.dcm", "MR_small_RLE.dcm", "rtdose.dcm", "image_dfl.dcm"]
)
def test_bundled_files_agree_with_pydicom(bundled: str) -> None:
    """Big endian, RLE, implicit multi-frame and pydicom's own deflated file: pydicom agrees."""
    import pydicom

    path = get_testdata_file(bundled, download=False)
    assert path is not None
    ds = pydicom.dcmread(path)
    assert read_uid(path, "SeriesInstanceUID") == ds.SeriesInstanceUID
    assert read_uid(path, "StudyInstanceUID") == ds.StudyInstanceUID


def test_group_key_is_a_keyed_hash_never_the_uid(tmp_path: Path) -> None:
    """The key names the kind and a keyed hash: same series, same key; another key, another
    hash; the UID's text appears nowhere in it."""
    series, study = new_uid(), new_uid()
    a = write(tmp_path, "a.dcm", ct_instance(series, study, 1))
    b = write(tmp_path, "b.dcm", ct_instance(series, study, 2))
    other = write(tmp_path, "c.dcm", ct_instance(new_uid(), study, 1))
    key_a = group_key(a, "series", KEY)
    assert key_a.startswith("series:") and len(key_a) == len("series:") + 32
    assert key_a == group_key(b, "series", KEY)
    assert key_a != group_key(other, "series", KEY)
    assert group_key(other, "study", KEY) == group_key(a, "study", KEY)
    assert key_a != group_key(a, "series", b"x" * 32)
    for uid in (series, study):
        assert uid not in key_a and uid.replace(".", "") not in key_a


@pytest.mark.parametrize(
    "data",
    [
        b"",
        b"diagnosis,age\nflu,40\n",
        b"\x89PNG\r\n\x1a\n" + b"\0" * 64,
        b"\0" * 128 + b"DICM",  # the magic and nothing else
        b"\0" * 128 + b"DICM" + bytes(range(256)) * 16,  # garbage after the magic
    ],
    ids=["empty", "csv", "png", "magic_only", "garbage"],
)
def test_anything_else_is_unknown(tmp_path: Path, data: bytes) -> None:
    assert group_key(write(tmp_path, "x.dcm", data), "series", KEY) == UNKNOWN_GROUP


def test_truncated_header_is_unknown(tmp_path: Path) -> None:
    """Cut before the UIDs: no group, no exception."""
    whole = ct_instance(new_uid(), new_uid(), 1)
    cut = whole.index(b"\x20\x00\x0d\x00")  # (0020,000D) explicit VR little endian
    assert group_key(write(tmp_path, "t.dcm", whole[:cut]), "study", KEY) == UNKNOWN_GROUP


def _deflated_with_zeros(n_zeros: int) -> bytes:
    """A Deflated DICOM whose dataset opens with a private element of `n_zeros` zero bytes, the
    UIDs after it: small on disk, huge inflated."""
    syntax = DeflatedExplicitVRLittleEndian.encode() + b"\0"
    ts = struct.pack("<HH2sH", 0x0002, 0x0010, b"UI", len(syntax)) + syntax
    length = struct.pack("<HH2sHI", 0x0002, 0x0000, b"UL", 4, len(ts))
    header = b"\0" * 128 + b"DICM" + length + ts
    deflater = zlib.compressobj(9, zlib.DEFLATED, -zlib.MAX_WBITS)
    body = [deflater.compress(struct.pack("<HH2sHI", 0x0009, 0x1010, b"OB", 0, n_zeros))]
    chunk = b"\0" * (1 << 20)
    for _ in range(n_zeros // len(chunk)):
        body.append(deflater.compress(chunk))
    uid = b"1.2.3.4\0"
    body.append(deflater.compress(struct.pack("<HH2sH", 0x0020, 0x000E, b"UI", len(uid)) + uid))
    body.append(deflater.flush())
    return header + b"".join(body)


def test_a_deflate_bomb_costs_a_bounded_read(tmp_path: Path) -> None:
    """256 MiB of zeros behind a small deflated file: at most HEADER_BYTES read, about a MiB
    inflated, and the file is simply "unknown" (the worker quarantines it as a bomb)."""
    data = _deflated_with_zeros(256 << 20)
    assert len(data) < HEADER_BYTES * 2
    path = write(tmp_path, "bomb.dcm", data)
    tracemalloc.start()
    started = time.perf_counter()
    try:
        assert group_key(path, "series", KEY) == UNKNOWN_GROUP
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 16 << 20, f"peak {peak} bytes"
    assert time.perf_counter() - started < 2.0


def test_a_header_past_the_bound_is_unknown(tmp_path: Path) -> None:
    """A private element bigger than HEADER_BYTES before the UIDs: not read to its end."""
    import pydicom

    source = get_testdata_file("CT_small.dcm", download=False)
    assert source is not None
    ds = pydicom.dcmread(source)
    ds.add_new(0x00091010, "OB", b"\0" * (HEADER_BYTES + 1024))
    path = tmp_path / "big.dcm"
    ds.save_as(path, enforce_file_format=True)
    assert pydicom.dcmread(path).SeriesInstanceUID  # pydicom reads it whole
    assert group_key(path, "series", KEY) == UNKNOWN_GROUP


def test_an_invalid_uid_reaches_no_log_or_warning(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """pydicom quotes a bad value in its warning: none may escape (warnings are errors here)."""
    bad = "1.2.CANARY.SERIES"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # pydicom warns while the test writes it, too
        path = write(tmp_path, "bad.dcm", ct_instance(bad, new_uid(), 1))
    caplog.clear()
    with caplog.at_level(logging.DEBUG):
        key = group_key(path, "series", KEY)
    assert key.startswith("series:")
    assert "CANARY" not in caplog.text

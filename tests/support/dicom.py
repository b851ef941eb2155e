"""DICOM instances built with pydicom for tests: a small CT (pydicom's bundled CT_small.dcm) given
a series, a study, an instance number, and any other attribute."""

from __future__ import annotations

import io
from typing import Any

import pydicom
from pydicom.data import get_testdata_file
from pydicom.uid import UID, ExplicitVRLittleEndian, generate_uid


def new_uid() -> str:
    return str(generate_uid())


def ct_instance(
    series_uid: str,
    study_uid: str,
    instance: int,
    *,
    syntax: UID = ExplicitVRLittleEndian,
    **attributes: Any,
) -> bytes:
    """A CT instance of `series_uid` in `study_uid`, encoded in `syntax`, as file bytes."""
    source = get_testdata_file("CT_small.dcm", download=False)
    assert source is not None, "CT_small.dcm is not bundled with this pydicom"
    ds = pydicom.dcmread(source)
    ds.SeriesInstanceUID = series_uid
    ds.StudyInstanceUID = study_uid
    ds.SOPInstanceUID = new_uid()
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.InstanceNumber = instance
    for keyword, value in attributes.items():
        setattr(ds, keyword, value)
    ds.file_meta.TransferSyntaxUID = syntax
    buffer = io.BytesIO()
    ds.save_as(
        buffer,
        implicit_vr=syntax.is_implicit_VR,
        little_endian=syntax.is_little_endian,
        enforce_file_format=True,
    )
    return buffer.getvalue()

"""DICOM reader: the header first (inflated in bounded chunks for the Deflated transfer syntax),
the pixel guard in bytes, then the pixels as stored. Runs in worker processes.
"""

from __future__ import annotations

import hashlib
import io
import zlib
from pathlib import Path
from typing import Any

from numpy.typing import NDArray
from pydicom import dcmread
from pydicom.dataset import Dataset, FileDataset
from pydicom.filereader import read_dataset, read_file_meta_info
from pydicom.pixels.decoders.base import get_decoder
from pydicom.pixels.processing import apply_color_lut
from pydicom.uid import UID, DeflatedExplicitVRLittleEndian, JPEGExtended12Bit

from daemon.processors.base import ProcessorError
from daemon.processors.image_guards import (
    Decoded,
    Limits,
    Source,
    Tags,
    check_frames,
    check_size,
    decoding,
)

__all__ = ["read_dicom"]

PIXEL_KEYWORDS = ("PixelData", "FloatPixelData", "DoubleFloatPixelData")
PREAMBLE_BYTES = 132  # 128-byte preamble + "DICM"
GROUP_LENGTH_ELEMENT_BYTES = 12  # (0002,0000) UL, explicit VR little endian
INFLATE_CHUNK_BYTES = 1 << 20
HEADER_ALLOWANCE_BYTES = 16 << 20  # the non-pixel part of a deflated dataset
# PixelData (or the encapsulated frames) and the array decoded from it are both alive.
DICOM_COPIES = 2
# Modalities whose images usually carry burned-in text (names, dates) in the pixels.
BURNED_IN_MODALITIES = frozenset({"US", "SC", "XC", "OT", "ES", "GM"})


def _inflate(path: Path, offset: int, cap_bytes: int) -> bytes:
    """A raw-deflate body, inflated a chunk at a time and refused past `cap_bytes`: pydicom would
    inflate the whole dataset in one call, before any check (a few MB of zeros → gigabytes)."""
    inflater = zlib.decompressobj(-zlib.MAX_WBITS)
    out = bytearray()
    with path.open("rb") as fh, decoding(path, "the deflated dataset could not be inflated"):
        fh.seek(offset)
        data = fh.read(INFLATE_CHUNK_BYTES)
        while data and not inflater.eof:
            out += inflater.decompress(data, INFLATE_CHUNK_BYTES)
            if len(out) > cap_bytes:
                raise ProcessorError(
                    path,
                    "decompression_bomb",
                    f"the deflated dataset inflates past {cap_bytes} bytes",
                )
            data = inflater.unconsumed_tail or fh.read(INFLATE_CHUNK_BYTES)
    if not inflater.eof:
        raise ProcessorError(path, "unreadable_image", "the deflated dataset is truncated")
    return bytes(out)


def _open(path: Path, limits: Limits) -> tuple[Dataset, bool]:
    """The dataset, and whether its pixels are already in memory (inflated) or still to read."""
    with decoding(path, "the DICOM header could not be parsed"):
        meta = read_file_meta_info(path)
        if meta.get("TransferSyntaxUID") != DeflatedExplicitVRLittleEndian:
            return dcmread(path, stop_before_pixels=True), False
        group_length = int(meta.get("FileMetaInformationGroupLength", 0))
    if not group_length:
        raise ProcessorError(path, "unreadable_image", "deflated, without a meta group length")
    offset = PREAMBLE_BYTES + GROUP_LENGTH_ELEMENT_BYTES + group_length
    body = _inflate(path, offset, limits.max_image_bytes + HEADER_ALLOWANCE_BYTES)
    with decoding(path, "the deflated DICOM dataset could not be parsed"):
        dataset = read_dataset(io.BytesIO(body), is_implicit_VR=False, is_little_endian=True)
        full = FileDataset(str(path), dataset, file_meta=meta)
        full.set_original_encoding(False, True, dataset.original_character_set)
    return full, True


def _int_tag(path: Path, ds: Dataset, keyword: str, default: int) -> int:
    value = ds.get(keyword)
    if value is None or value == "":
        return default
    try:
        number = int(value)
    except (TypeError, ValueError):
        raise ProcessorError(path, "unreadable_image", f"{keyword} is not an integer") from None
    if number < 0:
        raise ProcessorError(path, "unreadable_image", f"{keyword} is negative")
    return number


def _float_tag(ds: Dataset, keyword: str, index: int = 0) -> float | None:
    """A decimal tag's value (the `index`-th of a multi-valued one), or None if absent or odd."""
    value = ds.get(keyword)
    if value is None or value == "":
        return None
    try:
        number = float(value[index] if ds[keyword].VM > 1 else value)
    except (TypeError, ValueError, IndexError):
        return None
    return number if number == number and abs(number) != float("inf") else None


def _check_decoder(path: Path, syntax: UID, bits_stored: int) -> None:
    try:
        decoder = get_decoder(syntax)
    except NotImplementedError:
        raise ProcessorError(
            path, "unsupported_transfer_syntax", f"no pixel decoder for {syntax.name}"
        ) from None
    if not decoder.is_available:
        raise ProcessorError(
            path, "unsupported_transfer_syntax", f"{syntax.name}: no decoder plugin installed"
        )
    # pydicom's Pillow plugin, often the only one present, refuses 12-bit JPEG Extended; that is
    # a missing plugin (pylibjpeg, gdcm), not a broken file.
    if syntax == JPEGExtended12Bit and bits_stored > 8 and decoder.available_plugins == ("pillow",):
        raise ProcessorError(
            path, "unsupported_transfer_syntax", f"{syntax.name}, 12-bit: needs pylibjpeg or gdcm"
        )


def _check_pixels(path: Path, header: Dataset, limits: Limits) -> tuple[int, int]:
    """Rows x columns x frames x samples x bytes per sample, from the header; (frames, bits)."""
    rows = _int_tag(path, header, "Rows", 0)
    columns = _int_tag(path, header, "Columns", 0)
    if not rows or not columns:
        raise ProcessorError(path, "no_image", "no Rows and Columns")
    n_frames = _int_tag(path, header, "NumberOfFrames", 1) or 1
    samples = _int_tag(path, header, "SamplesPerPixel", 1) or 1
    bits_allocated = _int_tag(path, header, "BitsAllocated", 8) or 8
    sample_bytes = max(1, (bits_allocated + 7) // 8)
    if str(header.get("PhotometricInterpretation", "")) == "PALETTE COLOR":
        samples, sample_bytes = 3, 2  # the palette makes 16-bit RGB
    check_frames(path, n_frames, limits)
    check_size(path, rows * columns * n_frames * samples, sample_bytes, DICOM_COPIES, limits)
    return n_frames, _int_tag(path, header, "BitsStored", 0)


def _rescale(header: Dataset) -> tuple[float, float]:
    slope = _float_tag(header, "RescaleSlope")
    intercept = _float_tag(header, "RescaleIntercept")
    return (1.0 if slope is None else slope, 0.0 if intercept is None else intercept)


def _tags(header: Dataset, syntax: UID, bits_stored: int) -> Tags:
    """The safe, clinically useful attributes: never one that names or dates a patient."""
    modality = header.get("Modality")
    photometric = str(header.get("PhotometricInterpretation", ""))
    slope, intercept = _rescale(header)
    rescale_type = str(header.get("RescaleType", "")) or None
    is_ct = modality == "CT" and ("RescaleSlope" in header or "RescaleIntercept" in header)
    return {
        "modality": None if modality is None else str(modality),
        "rows": _int_or_none(header.get("Rows")),
        "columns": _int_or_none(header.get("Columns")),
        "bits_stored": bits_stored or None,
        "photometric": photometric or None,
        "transfer_syntax": str(syntax),
        "rescale_slope": slope,
        "rescale_intercept": intercept,
        "units": "HU" if is_ct and rescale_type in (None, "HU") else rescale_type,
        "pixel_spacing_row_mm": _float_tag(header, "PixelSpacing", 0),
        "pixel_spacing_col_mm": _float_tag(header, "PixelSpacing", 1),
        "slice_thickness_mm": _float_tag(header, "SliceThickness"),
        "series_number": _int_or_none(header.get("SeriesNumber")),
        "instance_number": _int_or_none(header.get("InstanceNumber")),
        # For series.csv only (not result.csv columns); imaging drops the description unless
        # the pipeline allows it.
        "_series": _digest(header.get("SeriesInstanceUID")),
        "_series_description": str(header.get("SeriesDescription", "")).strip() or None,
    }


def _digest(uid: Any) -> str | None:
    """Tells series apart inside the worker; the UID itself never goes further."""
    text = str(uid or "").strip("\0 ")
    return hashlib.sha256(text.encode()).hexdigest()[:16] if text else None


def _int_or_none(value: Any) -> int | None:
    try:
        return None if value is None or value == "" else int(value)
    except (TypeError, ValueError):
        return None


def _source(header: Dataset) -> Source:
    burned_in = str(header.get("BurnedInAnnotation", "")).strip().upper() == "YES"
    modality = str(header.get("Modality", "")).strip().upper()
    return Source.BURNED_IN if burned_in or modality in BURNED_IN_MODALITIES else Source.DICOM


def read_dicom(path: Path, limits: Limits) -> Decoded:
    # The header alone first: the pixel guard must run before any pixel byte is read or decoded.
    header, is_whole = _open(path, limits)
    syntax = header.file_meta.get("TransferSyntaxUID")
    if not isinstance(syntax, UID):
        raise ProcessorError(path, "unreadable_image", "no transfer syntax in the file meta")
    n_frames, bits_stored = _check_pixels(path, header, limits)
    _check_decoder(path, syntax, bits_stored)
    ds = header
    if not is_whole:
        with decoding(path, "the DICOM dataset could not be parsed"):
            ds = dcmread(path, stop_before_pixels=False)
    if not any(keyword in ds for keyword in PIXEL_KEYWORDS):
        raise ProcessorError(path, "no_image", "no pixel data")
    with decoding(path, f"{syntax.name} pixel data could not be decoded"):
        # Stored values; the modality LUT is applied to the statistics (linear, so exact), not
        # to the pixels. YBR is converted to RGB and a palette applied, so thumbnails look right.
        pixels: NDArray[Any] = ds.pixel_array
        if str(header.get("PhotometricInterpretation", "")) == "PALETTE COLOR":
            pixels = apply_color_lut(pixels, ds)
    tags = _tags(header, syntax, bits_stored)
    series, instance = tags["series_number"], tags["instance_number"]
    return Decoded(
        list(pixels) if n_frames > 1 else [pixels],
        tags,
        _source(header),
        _rescale(header),
        (
            series if isinstance(series, int) else 2**31,
            instance if isinstance(instance, int) else 2**31,
        ),
    )

"""No patient value in library logs (hostile-ground 12.4): canaries in the metadata of every image
format (TIFF tags, PNG text chunks, JPEG comments and EXIF, DICOM patient and private tags) and in
file names, through a live imaging pipeline, good files and failing ones. A library does log
(tifffile, on the ImageJ tags): it reaches stderr only as a library.record, and no canary appears
in stderr, the audit log, the manifest, result.csv, the sidecars or the journal."""

from __future__ import annotations

from tests.security.corpus import emr_pipeline, leaks, quarantine_reasons
from tests.security.metadata import (
    dicom_with_private,
    jpeg_with_comment_and_exif,
    png_text_chunks,
    png_with_text,
    tiff_with_tags,
)
from tests.support.accounting import check_accounting
from tests.support.waiting import wait_until
from tests.system.conftest import MakeService

FILE_NAME_CANARY = "CNRYFNAME"
PATIENT = {
    "PatientName": "CNRYDCMNAME^ZEPHYRINE",
    "PatientID": "CNRYDCMPID",
    "PatientBirthDate": "CNRYDOB-BAD",  # not even a date: pydicom warns, quoting it
    "OtherPatientIDs": "CNRYDCMOTHER",
}


def files() -> dict[str, bytes]:
    tiff_tags = {
        270: b"CNRYTIFFDESC Doe^John " + b"\xff\xfe",  # a byte that is not text
        305: b"CNRYTIFFSOFT",
        315: b"CNRYTIFFARTIST",
        50838: b"abcd",  # ImageJ metadata tags that tifffile fails on, and logs
        50839: b"CNRYTIFFIJ",
    }
    png = png_with_text(png_text_chunks("CNRYPNGTEXT"))
    idat = png.index(b"IDAT")
    return {
        f"Doe_{FILE_NAME_CANARY}_MRN4471.tif": tiff_with_tags(tiff_tags),
        "notes.png": png,
        "photo.jpg": jpeg_with_comment_and_exif("CNRYJPEGTEXT"),
        "ct.dcm": dicom_with_private(PATIENT, "CNRYDCMPRIV"),
        # failing files, their metadata read before they fail
        "cut.png": png[: idat + 12],
        "cut.dcm": dicom_with_private(PATIENT, "CNRYDCMPRIV")[:-3000],
        "cut.jpg": jpeg_with_comment_and_exif("CNRYJPEGTEXT")[:-200],
    }


CONTENT_CANARIES = ["CNRYTIFFDESC", "CNRYTIFFSOFT", "CNRYTIFFARTIST", "CNRYTIFFIJ",
                    "CNRYPNGTEXT", "CNRYJPEGTEXT", "CNRYDCMNAME", "ZEPHYRINE", "CNRYDCMPID",
                    "CNRYDOB", "CNRYDCMOTHER", "CNRYDCMPRIV", "Doe^John"]  # fmt: skip


def test_metadata_and_name_canaries_never_leave_a_worker(make_service: MakeService) -> None:
    """Every format's metadata carriers hold canaries; none is found anywhere, and the library
    record that tifffile made is there, as a code."""
    service = make_service(
        [emr_pipeline("imaging", kind="imaging", hash_names=True, contact_sheet="on")]
    )
    service.start(env={"MEDBATCH_LOG_LEVEL": "DEBUG"})  # the most a library can say
    content = files()
    dropped = {name: service.drop("imaging", name, data) for name, data in content.items()}
    wait_until(lambda: service.accounted() == len(content), 60, message="all accounted")
    assert service.stop() == 0

    # The failing files took their error paths
    assert set(quarantine_reasons(service, "imaging")) >= {"cut.png", "cut.dcm"}
    # Metadata canaries: nowhere at all
    assert not leaks(service, CONTENT_CANARIES)
    # File names are published by the name policy's rules (manifest, result.csv, journal), but
    # never logged, and audited only hashed under hash_names
    # The audit files as written (service.audit() maps hashed names back for other tests).
    audit = "\n".join(p.read_text() for p in (service.outbox / "_audit").glob("audit-*.jsonl"))
    assert FILE_NAME_CANARY not in service.stderr()
    assert FILE_NAME_CANARY not in audit
    # A library did speak: as a code, with its logger and level only
    records = [line for line in service.logs() if line.get("event") == "library.record"]
    assert any(r["logger"].startswith("tifffile") for r in records), records
    assert all(set(r) <= {"event", "logger", "level", "code", "timestamp"} for r in records)
    check_accounting(service, dropped)

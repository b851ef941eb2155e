"""Item 6: no patient value in any output. Canaries in every identifying field of EMR tables,
DICOM files and genomics sample names, through all three pipelines, on the happy path and the
error paths (files that fail to parse, files dropped into the wrong pipeline): none appears in
a published file, the audit log, a quarantine sidecar, the journal or the service's stderr."""

from __future__ import annotations

from tests.security.corpus import dicom_with, emr_pipeline, leaks, quarantine_reasons
from tests.support.accounting import check_accounting
from tests.support.waiting import wait_until
from tests.system.conftest import MakeService

# Published by design, so never canaries: file names, group labels, gene symbols.
DICOM_CANARIES = {
    "PatientName": "CNRYNAME^ZEPHYRINE",
    "PatientID": "CNRYPID-4711",
    "PatientBirthDate": "19010203",
    "AccessionNumber": "CNRYACC99",
    "InstitutionName": "CNRY GENERAL HOSPITAL",
    "ReferringPhysicianName": "CNRYDOC^HOUSE",
    "StudyDescription": "CNRY STUDY OF ZEPHYRINE",
}
IDENTIFIER_COLUMNS = ("patient_id", "name", "mrn", "dob", "ssn", "address", "phone", "email")


def canary(column: str, row: int) -> str:
    return f"CNRY{column.upper()}{row:04d}"


def emr_table(rows: int = 24, *, extra: str = "") -> bytes:
    header = ",".join((*IDENTIFIER_COLUMNS, "diagnosis", "age", "notes"))
    lines = [header]
    for row in range(rows):
        ids = ",".join(canary(c, row) for c in IDENTIFIER_COLUMNS)
        note = f'"seen by {canary("note", row)}, stable"'
        lines.append(f"{ids},{'asthma' if row % 2 else 'copd'},{30 + row % 7},{note}")
    return ("\n".join(lines) + "\n" + extra).encode()


def canaries() -> list[str]:
    found = [canary(c, r) for c in (*IDENTIFIER_COLUMNS, "note") for r in range(24)]
    found += [v for value in DICOM_CANARIES.values() for v in value.split("^")]
    found += [canary("sample", s) for s in range(6)] + [canary("badage", 0)]
    return found


def test_no_canary_reaches_any_output(make_service: MakeService) -> None:
    """Canaries everywhere a patient value can be, through emr, imaging and genomics, good files
    and failing ones: zero hits in outputs, audit, sidecars, journal and stderr."""
    service = make_service(
        [
            emr_pipeline(),
            emr_pipeline("imaging", kind="imaging"),
            emr_pipeline("genomics", kind="genomics"),
        ]
    )
    service.start()
    bad_dicom = dicom_with({**DICOM_CANARIES, "PatientBirthDate": "CNRYBIRTH-X"})
    long_genomics = "gene,sample,expression\n" + "".join(
        f"GENE{g},{canary('sample', s)},{g + s / 10}\n" for g in range(5) for s in range(6)
    )
    wide_genomics = (
        "gene,"
        + ",".join(canary("sample", s) for s in range(6))
        + "\n"
        + "".join(f"GENE{g}," + ",".join(str(g + s) for s in range(6)) + "\n" for g in range(5))
    )
    drops = {
        # the happy path
        ("emr", "visits.csv"): emr_table(),
        ("imaging", "scan.dcm"): dicom_with(DICOM_CANARIES),
        ("imaging", "odd-dates.dcm"): bad_dicom,
        ("genomics", "long.csv"): long_genomics.encode(),
        ("genomics", "wide.csv"): wide_genomics.encode(),
        # rows that fail to parse, with the canary in the very cell the parser would quote
        ("emr", "ragged.csv"): emr_table(extra=f"{canary('ragged', 0)},x,y\n"),
        ("emr", "badage.csv"): emr_table().replace(b",30,", f",{canary('badage', 0)},".encode(), 1),
        ("emr", "latin1.csv"): emr_table() + "é,é\n".encode("latin-1"),
        ("emr", "quote.csv"): emr_table(extra=f'"{canary("quote", 0)}\n'),
        ("imaging", "truncated.dcm"): dicom_with(DICOM_CANARIES, truncate_pixels=True),
        ("genomics", "gragged.csv"): (long_genomics + f"G,{canary('gragged', 0)},1,2\n").encode(),
        # the wrong pipeline
        ("emr", "dicom-in-emr.dcm"): dicom_with(DICOM_CANARIES),
        ("genomics", "emr-in-genomics.csv"): emr_table(),
        ("imaging", "emr-in-imaging.csv"): emr_table(),
    }
    dropped = {}
    for (pipeline, name), content in drops.items():
        dropped[name] = service.drop(pipeline, name, content)
    wait_until(lambda: service.accounted() == len(drops), 60, message="all accounted")
    assert service.stop() == 0

    found = leaks(service, [*canaries(), canary("ragged", 0), canary("quote", 0),
                            canary("gragged", 0), "CNRYBIRTH"])  # fmt: skip
    assert not found
    # the error paths were taken
    assert set(quarantine_reasons(service, "emr")) >= {"ragged.csv", "latin1.csv", "quote.csv",
                                                       "dicom-in-emr.dcm"}  # fmt: skip
    assert set(quarantine_reasons(service, "imaging")) >= {"truncated.dcm", "emr-in-imaging.csv"}
    assert "emr-in-genomics.csv" in quarantine_reasons(service, "genomics")
    check_accounting(service, dropped)

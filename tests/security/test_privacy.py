"""Item 5: results hold groups, not people. Identifiers never reach a published file; small cells
are suppressed ("blank") or folded into `other` ("merge"); grouping by an identifier is refused."""

from __future__ import annotations

from tests.security.corpus import emr_pipeline, leaks, published_names
from tests.support.accounting import check_accounting
from tests.support.service import Service
from tests.support.waiting import wait_until
from tests.system.conftest import MakeService

# (diagnosis, rows, age, systolic_bp): constant per group, so every mean is exact.
GROUPS = [("asthma", 12, 40, 120), ("copd", 3, 70, 150), ("flu", 15, 30, 110),
          ("rare", 1, 90, 160), ("sepsis", 11, 50, 100)]  # fmt: skip


def identified_table(groups: list[tuple[str, int, int, int]]) -> bytes:
    """Every row carries identifiers, numeric ones (mrn, zip) among them, under the names a
    real export uses ("Patient ID", "PHONE"): none may be averaged or published."""
    lines = ["Patient ID,name,mrn,zip,PHONE,diagnosis,age,systolic_bp"]
    person = 0
    for group, rows, age, bp in groups:
        for _ in range(rows):
            person += 1
            lines.append(
                f"PID-{person:05d},Name{person:05d} Surname,{880000 + person},"
                f"{10000 + person},555{person:07d},{group},{age},{bp}"
            )
    return ("\n".join(lines) + "\n").encode()


ONE_SMALL_CELL = [("a", 12, 1, 10), ("b", 20, 2, 20), ("c", 5, 3, 30)]

# Suppressed cells: label, n and means withheld, listed last (their labels would say that a
# "rare" diagnosis was seen at all).
EXPECTED_BLANK = (
    '"diagnosis","n","mean_age","mean_systolic_bp","suppressed"\n'
    '"asthma",12,40.0,120.0,false\n'
    '"flu",15,30.0,110.0,false\n'
    '"sepsis",11,50.0,100.0,false\n'
    '"","","","",true\n'
    '"","","","",true\n'
)
# copd (3) and rare (1) are 4 rows: too few, so the smallest group, sepsis (11), joins them.
EXPECTED_MERGE = (
    '"diagnosis","n","mean_age","mean_systolic_bp","suppressed"\n'
    '"asthma",12,40.0,120.0,false\n'
    '"flu",15,30.0,110.0,false\n'
    f'"other",15,{(3 * 70 + 90 + 11 * 50) / 15!r},{(3 * 150 + 160 + 11 * 100) / 15!r},false\n'
)
# One small cell alone could be recovered by subtraction: the smallest other group is
# suppressed with it.
EXPECTED_COMPLEMENTARY = (
    '"diagnosis","n","mean_age","mean_systolic_bp","suppressed"\n'
    '"b",20,2.0,20.0,false\n'
    '"","","","",true\n'
    '"","","","",true\n'
)


def result_of(service: Service, pipeline: str) -> str:
    (manifest,) = service.manifests(pipeline)
    return (service.outbox / pipeline / manifest["batch_id"] / "result.csv").read_text()


def test_small_cells_are_suppressed_and_identifiers_never_published(
    make_service: MakeService,
) -> None:
    """The same table through "blank" and "merge" pipelines, and a table with one small cell:
    the exact results; no identifier column, value or header reaches any published file."""
    service = make_service(
        [
            emr_pipeline("blank", small_cells="blank"),
            emr_pipeline("merge", small_cells="merge"),
            emr_pipeline("single"),
        ]
    )
    service.start()
    table = identified_table(GROUPS)
    dropped = {
        "visits.csv": service.drop("blank", "visits.csv", table),
        "visits2.csv": service.drop("merge", "visits2.csv", table),
        "one.csv": service.drop("single", "one.csv", identified_table(ONE_SMALL_CELL)),
    }
    wait_until(lambda: published_names(service) == set(dropped), 30)
    assert service.stop() == 0

    assert result_of(service, "blank") == EXPECTED_BLANK
    assert result_of(service, "merge") == EXPECTED_MERGE
    assert result_of(service, "single") == EXPECTED_COMPLEMENTARY
    # The exact results above hold no identifier column or value (mrn and zip are numbers:
    # never averaged); the text identifiers appear in no published file, log or sidecar either.
    assert not leaks(service, ["PID-0", "Surname", "Patient ID", "PHONE"])
    check_accounting(service, dropped)


def test_grouping_by_an_identifier_is_a_config_error(make_service: MakeService) -> None:
    """group_by naming an identifier column (in any spelling) is refused: exit 78, key named."""
    service = make_service([emr_pipeline(group_by="Patient-ID")])
    done = service.run("check-config", timeout_s=30)
    assert done.returncode == 78
    assert "pipeline[0].group_by" in done.stderr
    assert "identifier" in done.stderr

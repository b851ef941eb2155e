"""Decoder bombs through a live service whose workers are capped in address space by the
product's own `[workers] memory_limit` (hostile-ground 12.1): each bomb costs its own file,
quarantined with its reason, while good files of the same pipelines publish and the workers
live on."""

from __future__ import annotations

import resource
from pathlib import Path

from tests.security.corpus import published_names, quarantine_reasons, small_png, tiff_pages
from tests.support.accounting import check_accounting
from tests.support.waiting import wait_until
from tests.system.conftest import MakeService
from tests.unit.processors import bombs

MIB = 1 << 20
BUDGET_BYTES = 1536 * MIB  # far below what any bomb here decodes to


def pipelines() -> list[dict[str, object]]:
    common = {"max_files": 1000, "max_wait": 2, "settle_s": 0.1}
    return [
        {"name": "imaging", "kind": "imaging", "max_image_bytes": 256 * MIB, **common},
        {"name": "genomics", "kind": "genomics", "compressed": True, **common},
        {"name": "plain", "kind": "genomics", **common},
    ]


def test_bombs_cost_only_their_own_file(make_service: MakeService) -> None:
    """A deflated DICOM of 4 GB, a 16-bit PNG of a gigabyte, a TIFF of 300 huge pages, a gzip
    of 100 M rows, 150,000 sample columns, a zstd table hiding its header; beside them good
    images and tables: every bomb quarantined with its reason, every good file published."""
    workers = {"count": 2, "batch_timeout_s": 120, "memory_limit": BUDGET_BYTES}
    service = make_service(pipelines(), workers=workers)
    service.start()
    wait_until(lambda: len(service.worker_pids()) == 2, 60, message="the workers started")
    hidden = bombs.zstd_hidden_header(bombs.varied_rows(40))
    hostile = {
        ("imaging", "deflated.dcm"): (bombs.deflated_dicom_bomb(4000 * MIB), "decompression_bomb"),
        ("imaging", "deep.png"): (bombs.png_zeros(13_000, 13_000, 16), "too_many_pixel_bytes"),
        ("imaging", "pages.tif"): (tiff_pages(300, 8192, 8192), "too_many_pixels"),
        ("genomics", "rows.csv"): (bombs.gzip_row_bomb(100_000_000), "decompression_bomb"),
        ("genomics", "wide.csv"): (bombs.wide_header(150_000), "too_many_columns"),
        ("plain", "hidden.csv"): (hidden, "compressed_input"),
    }
    good = {
        ("imaging", "ok.png"): small_png(3),
        ("imaging", "ok-deflated.dcm"): bombs.deflated_dicom(MIB),
        ("imaging", "ok-16bit.png"): bombs.png_zeros(2000, 2000, 16),
        ("genomics", "hidden-ok.csv"): hidden,  # allowed here: read from the decoded stream
        # other samples than hidden-ok.csv's: no (gene, sample) pair in both
        ("genomics", "ok.csv"): bombs.varied_rows(200, seed=8).replace(b",S", b",T"),
        ("plain", "ok-plain.tsv"): bombs.varied_rows(100, seed=9).replace(b",", b"\t"),
    }
    dropped = {}
    for (pipeline, name), (content, _) in hostile.items():
        dropped[name] = service.drop(pipeline, name, content)
    for (pipeline, name), content in good.items():
        dropped[name] = service.drop(pipeline, name, content)
    wait_until(lambda: service.accounted() == len(dropped), 120, message="all accounted")
    workers_alive = service.worker_pids()
    limits = [resource.prlimit(pid, resource.RLIMIT_AS)[0] for pid in workers_alive]
    assert service.process is not None
    main_limit = resource.prlimit(service.process.pid, resource.RLIMIT_AS)[0]
    scores = [Path(f"/proc/{pid}/oom_score_adj").read_text().strip() for pid in workers_alive]
    assert service.stop() == 0

    reasons = quarantine_reasons(service)
    assert {name: reasons.get(name) for (_, name) in hostile} == {
        name: reason for (_, name), (_, reason) in hostile.items()
    }
    assert {name for (_, name) in good} <= published_names(service)
    assert workers_alive, "the workers died"
    assert limits and all(limit != resource.RLIM_INFINITY for limit in limits), "no cap in force"
    assert main_limit == resource.RLIM_INFINITY, "only the workers are capped"
    assert scores == ["500"] * len(workers_alive), "the OOM killer would not take a worker first"
    check_accounting(service, dropped)

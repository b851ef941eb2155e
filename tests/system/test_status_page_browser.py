"""The status page in a real browser (headless Debian chromium via Playwright): what a person
sees after files are dropped, after an input is quarantined, and while intake is paused.

A screenshot of each state is kept under tests/artifacts/.
"""

from __future__ import annotations

import json
import random
import re
from typing import TYPE_CHECKING

import pytest

from tests.support.browser import chromium_page, screenshot
from tests.support.data import emr_csv
from tests.support.endpoints import LOOPBACK_ANY_PORT, base_url
from tests.support.faults import paused_by_full_outbox
from tests.support.service import Service
from tests.support.waiting import wait_until
from tests.system.conftest import MakeService

if TYPE_CHECKING:
    from playwright.sync_api import Page

expect = pytest.importorskip(
    "playwright.sync_api", reason="no browser driver: pip install -e '.[dev]' (playwright)"
).expect

SERVICE = {"tick_s": 0.1, "rescan_s": 2, "metrics_address": LOOPBACK_ANY_PORT}
# Longer than one refresh of the page (5 s) plus a batch's run on a loaded machine.
SEEN_MS = 45_000


def emr(**overrides: object) -> dict[str, object]:
    return {
        "name": "emr",
        "kind": "emr",
        "max_files": 3,
        "max_wait": 600,
        "settle_s": 0.1,
        **overrides,
    }


def check_links(page: Page, base: str, service: Service, batch_id: str) -> None:
    """The published row's links return the files in the outbox; manifest.json opens."""
    row = page.locator(f'tr.recent-batch[data-batch="{batch_id}"]')
    folder = service.outbox / "emr" / batch_id
    href = row.get_by_role("link", name="result.csv").get_attribute("href")
    assert href == f"/outbox/emr/{batch_id}/result.csv"
    response = page.request.get(base + href)
    assert response.status == 200 and response.body() == (folder / "result.csv").read_bytes()
    row.get_by_role("link", name="manifest.json").click()
    manifest = json.loads(page.locator("body").inner_text())
    assert manifest["batch_id"] == batch_id
    page.go_back()


def test_page_shows_published_batches_and_quarantine(make_service: MakeService) -> None:
    """Opened before anything arrives, the page refreshes by itself: a published batch appears
    with working links, then a quarantined input with its reason, and never a file name."""
    service = make_service([emr()], service=SERVICE)
    service.start()
    base = base_url(service)
    rng = random.Random(3)
    with chromium_page() as page:
        page.goto(base + "/")
        section = page.locator('section[data-pipeline="emr"]')
        expect(section.get_by_text("No batch finished yet.")).to_be_visible()
        expect(page.locator("#banner-ok")).to_be_visible()

        # When three good files are dropped (the page is not reloaded by the test)
        for i in range(3):
            service.drop("emr", f"canary-visit-{i}.csv", emr_csv(rng))
        # Then a published batch row appears, with its links
        expect(section.locator("tr.recent-batch")).to_have_count(1, timeout=SEEN_MS)
        (batch_id,) = [m["batch_id"] for m in service.manifests("emr")]
        row = section.locator("tr.recent-batch")
        expect(row).to_contain_text(batch_id)
        expect(row).to_contain_text("published")
        expect(section.locator("td.throughput")).to_have_text("3 files in 1 batch")
        check_links(page, base, service, batch_id)
        screenshot(page, "status-page-published")

        # When a batch has an unreadable input
        service.drop("emr", "canary-good.csv", emr_csv(rng))
        service.drop("emr", "canary-junk.csv", b"\x00\x01 junk, not a table")
        service.drop("emr", "canary-good-2.csv", emr_csv(rng))
        wait_until(lambda: service.quarantined("emr"), 60, message="a quarantined input")
        (sidecar,) = service.quarantined("emr")
        # Then the quarantine list shows it with its reason, without its name
        quarantined = section.locator("tr.quarantine-row")
        expect(quarantined).to_have_count(1, timeout=SEEN_MS)
        expect(quarantined.locator("td.reason")).to_have_text(sidecar["reason"])
        expect(quarantined).to_contain_text(sidecar["sha256"][:12])
        expect(section.locator(".quarantine-summary")).to_have_text(f"{sidecar['reason']}: 1")
        expect(section.locator("tr.recent-batch")).to_have_count(2)
        expect(page.locator("tr.audit-line").first).to_be_visible()
        screenshot(page, "status-page-quarantined")
        assert "canary" not in page.content().lower()
    assert service.stop() == 0


def test_page_shows_the_paused_banner(make_service: MakeService) -> None:
    """With the outbox full, intake pauses: the page shows the paused and degraded banners
    and the files waiting; when space returns the banners go by themselves."""
    service = make_service([emr(max_files=2, max_wait=1)], service=SERVICE)
    with paused_by_full_outbox(service, seed=4) as ballast:
        base = base_url(service)
        with chromium_page() as page:
            page.goto(base + "/")
            banner = page.locator("#banner-paused")
            expect(banner).to_be_visible(timeout=SEEN_MS)
            expect(banner).to_have_text(
                re.compile(r"Intake paused \((disk_full|audit_unwritable|io_error)\)")
            )
            expect(page.locator("#banner-degraded")).to_contain_text("intake paused")
            expect(page.locator("#service-state")).to_have_text("degraded")
            screenshot(page, "status-page-paused")
            # When space returns, the page says so without being reloaded by anyone
            ballast.unlink()
            expect(page.locator("#banner-ok")).to_be_visible(timeout=SEEN_MS)
            expect(banner).to_have_count(0)
        wait_until(lambda: service.accounted() == 4, 60, message="all published")
        assert service.stop() == 0

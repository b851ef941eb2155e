"""Headless Debian chromium driven by Playwright, for the status page's system tests.

Never `playwright install`: the browser is the distribution's, installed here with apt-get when
missing and running as root (as CI does). If that fails, the test fails under CI (`CI` set: the
page must be checked there) and skips, saying why, only on a developer's machine without root.
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

if TYPE_CHECKING:
    from playwright.sync_api import Page

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]
ARTIFACTS = Path(__file__).resolve().parents[1] / "artifacts"


def _ensure_chromium() -> str | None:
    """None when the browser is there (installed now if need be), else why it is not."""
    if importlib.util.find_spec("playwright") is None:
        return "the playwright package is not installed (pip install -e '.[dev]')"
    if Path(CHROMIUM).exists():
        return None
    if os.geteuid() != 0 or shutil.which("apt-get") is None:
        return f"{CHROMIUM} is missing and cannot be installed here (needs root and apt-get)"
    done = subprocess.run(
        ["apt-get", "install", "-y", "-q", "chromium"], capture_output=True, timeout=900
    )
    if done.returncode != 0 or not Path(CHROMIUM).exists():
        return f"apt-get install chromium failed: {done.stderr.decode(errors='replace')[-300:]}"
    return None


@contextlib.contextmanager
def chromium_page() -> Iterator[Page]:
    """A fresh page in headless chromium; the browser and its driver end with the block."""
    reason = _ensure_chromium()
    if reason is not None:
        if os.environ.get("CI"):
            pytest.fail(f"no browser for the status page test in CI: {reason}")
        pytest.skip(f"no browser for the status page test: {reason}")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": 1280, "height": 900})
            yield page
        finally:
            browser.close()


def screenshot(page: Page, name: str) -> Path:
    """Keep what a person saw as a test artefact (`tests/artifacts/`, git-ignored)."""
    ARTIFACTS.mkdir(exist_ok=True)
    path = ARTIFACTS / f"{name}.png"
    page.screenshot(path=str(path), full_page=True)
    return path
